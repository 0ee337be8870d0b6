//! Zero-copy passthrough: bytes of a connection that is passed through move from one socket to
//! the other through a pipe with `splice(2)`, inside the kernel, never copied into the sidecar.
//! Each direction has its own pipe; the pipe is drained before the next read, so a read never
//! waits on a full pipe and a write never on an empty one, and the sockets' readiness alone
//! drives the loop.

use std::{io, os::fd::OwnedFd};

use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::{io::Interest, net::TcpStream};

/// The pipe each direction asks for: one splice moves up to this much.
const PIPE_SIZE: usize = 1 << 20;

/// One direction's pipe, and how much one splice may move through it.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // The default pipe is 64 KiB; a larger one may be refused (fs.pipe-max-size), which is fine.
        let size = rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE)
            .or_else(|_| rustix::pipe::fcntl_getpipe_size(&write))?;
        Ok(Self { read, write, size })
    }
}

/// Copies `from` to `to` until `from` ends, then shuts `to` for writing: the bytes copied.
async fn one_way(from: &TcpStream, to: &TcpStream, pipe: Pipe) -> io::Result<u64> {
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    let mut total = 0u64;
    loop {
        from.readable().await?;
        let filled = match from
            .try_io(Interest::READABLE, || Ok(rustix::pipe::splice(from, None, &pipe.write, None, pipe.size, flags)?))
        {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut left = filled;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || Ok(rustix::pipe::splice(&pipe.read, None, to, None, left, flags)?)) {
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += filled as u64;
    }
    socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
    Ok(total)
}

/// Copies `a` to `b` and `b` to `a` until both have ended, as `tokio::io::copy_bidirectional`
/// does: the bytes `a` sent and the bytes `b` sent. An error in either direction ends both.
/// Without pipes (out of descriptors), the bytes go through buffers of `fallback_buffer`.
pub async fn copy_bidirectional(
    a: &mut TcpStream,
    b: &mut TcpStream,
    fallback_buffer: usize,
) -> io::Result<(u64, u64)> {
    match Pipe::new().and_then(|up| Ok((up, Pipe::new()?))) {
        Ok((up, down)) => tokio::try_join!(one_way(a, b, up), one_way(b, a, down)),
        Err(e) => {
            tracing::debug!("no pipe for a zero-copy passthrough ({e}): copying through buffers");
            tokio::io::copy_bidirectional_with_sizes(a, b, fallback_buffer, fallback_buffer).await
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    /// A connected pair of sockets: (the side we keep, the side given to the copy).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn both_directions_arrive_whole_and_half_closes_pass_on() {
        let (mut client, mut a) = pair().await;
        let (mut server, mut b) = pair().await;
        let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b, 1024).await });

        // More than a pipe holds, in odd-sized writes; the server answers after the client ends.
        let sent: Vec<u8> = (0..5_000_003u32).map(|i| (i % 251) as u8).collect();
        let expect = sent.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(77_777) {
                client.write_all(chunk).await.unwrap();
            }
            client.shutdown().await.unwrap();
            let mut answer = vec![];
            client.read_to_end(&mut answer).await.unwrap();
            answer
        });
        let mut got = vec![];
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == expect, "the bytes arrive in order, unchanged ({} of {})", got.len(), expect.len());
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"done");
        assert_eq!(copy.await.unwrap().unwrap(), (5_000_003, 4));
    }

    #[tokio::test]
    async fn a_reset_ends_the_copy_with_an_error() {
        let (client, mut a) = pair().await;
        let (server, mut b) = pair().await;
        let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b, 1024).await });
        socket2::SockRef::from(&server).set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(server);
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), copy).await.unwrap().unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionReset, "while the client still has its side open");
        drop(client);
    }
}
