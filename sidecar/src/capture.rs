//! Transparent capture: the nat rules that send a pod's outbound TCP to the sidecar
//! (`bulwark-sidecar redirect`, run by the injected init container).
//!
//! The rules live in chains of their own, jumped to from `OUTPUT`: `BULWARK_OUTPUT` decides
//! what is captured (not the sidecar's own uid, not loopback, not the exclusions), and
//! `BULWARK_REDIRECT` sends it to the sidecar's transparent port. Installing flushes and refills
//! those chains and adds the jump only when it is missing, so running it again changes nothing;
//! removing deletes the jump and the chains.

use std::{
    io::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

pub const OUTPUT_CHAIN: &str = "BULWARK_OUTPUT";
pub const REDIRECT_CHAIN: &str = "BULWARK_REDIRECT";

/// What to capture.
#[derive(Clone, Debug)]
pub struct Capture {
    /// The sidecar's uid: its own upstream connections are never captured again.
    pub proxy_uid: u32,
    /// The sidecar's transparent listener.
    pub redirect_port: u16,
    /// Destination ports captured.
    pub ports: Vec<u16>,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<Cidr>,
    /// When given, only these destinations are captured.
    pub include_cidrs: Vec<Cidr>,
}

/// An address block, `10.0.0.0/8` or `2001:db8::/32` (a bare address is a /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a.parse().map_err(|_| format!("{s:?} is not an address block like 10.0.0.0/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() { max } else { p.parse().map_err(|_| format!("{s:?}: bad prefix length"))? };
        if prefix > max {
            return Err(format!("{s:?}: the prefix is at most {max}"));
        }
        Ok(Self { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Self::V4 => "127.0.0.0/8",
            Self::V6 => "::1/128",
        }
    }

    fn holds(self, c: &Cidr) -> bool {
        c.addr.is_ipv4() == (self == Self::V4)
    }
}

impl Capture {
    /// The `iptables-restore --noflush` input for one family: both chains declared (which
    /// empties them) and filled.
    pub fn script(&self, family: Family) -> String {
        let mut out = format!("*nat\n:{OUTPUT_CHAIN} - [0:0]\n:{REDIRECT_CHAIN} - [0:0]\n");
        let mut add = |rule: String| {
            out.push_str(&rule);
            out.push('\n');
        };
        add(format!("-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}", self.redirect_port));
        add(format!("-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN", self.proxy_uid));
        add(format!("-A {OUTPUT_CHAIN} -d {} -j RETURN", family.loopback()));
        for p in &self.exclude_ports {
            add(format!("-A {OUTPUT_CHAIN} -p tcp --dport {p} -j RETURN"));
        }
        for c in self.exclude_cidrs.iter().filter(|c| family.holds(c)) {
            add(format!("-A {OUTPUT_CHAIN} -d {c} -j RETURN"));
        }
        let ports = self.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        let dports =
            if self.ports.len() == 1 { format!("--dport {ports}") } else { format!("-m multiport --dports {ports}") };
        if self.include_cidrs.is_empty() {
            add(format!("-A {OUTPUT_CHAIN} -p tcp {dports} -j {REDIRECT_CHAIN}"));
        } else {
            for c in self.include_cidrs.iter().filter(|c| family.holds(c)) {
                add(format!("-A {OUTPUT_CHAIN} -d {c} -p tcp {dports} -j {REDIRECT_CHAIN}"));
            }
        }
        out.push_str("COMMIT\n");
        out
    }
}

/// The jump from `OUTPUT` into our chain.
const JUMP: [&str; 4] = ["-p", "tcp", "-j", OUTPUT_CHAIN];

/// Which iptables the node uses: the legacy and the nf_tables backends keep separate rules, and
/// the kubelet's and CNI's rules say which is in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
    /// Whatever `iptables` is.
    Default,
}

impl Backend {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "legacy" => Ok(Self::Legacy),
            "nft" => Ok(Self::Nft),
            "auto" => Ok(Self::detect()),
            _ => Err(format!("{s:?}: use auto, nft or legacy")),
        }
    }

    /// The backend holding more rules (as `istio-iptables` decides); `iptables` when neither runs.
    pub fn detect() -> Self {
        let count = |bin: &str| {
            Command::new(bin)
                .arg("-t")
                .arg("nat")
                .arg("-S")
                .stderr(Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| o.stdout.split(|b| *b == b'\n').filter(|l| l.starts_with(b"-A")).count())
        };
        match (count("iptables-legacy"), count("iptables-nft")) {
            (Some(l), Some(n)) if l > n => Self::Legacy,
            (_, Some(_)) => Self::Nft,
            (Some(_), None) => Self::Legacy,
            (None, None) => Self::Default,
        }
    }

    /// The binary for a family, and the matching restore binary.
    fn bins(self, family: Family) -> (String, String) {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        match self {
            Self::Legacy => (format!("{base}-legacy"), format!("{base}-legacy-restore")),
            Self::Nft => (format!("{base}-nft"), format!("{base}-nft-restore")),
            Self::Default => (base.to_owned(), format!("{base}-restore")),
        }
    }
}

fn run(bin: &str, args: &[&str]) -> anyhow::Result<bool> {
    let out = Command::new(bin).args(args).output().with_context(|| format!("running {bin}"))?;
    Ok(out.status.success())
}

fn must(bin: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(bin).args(args).output().with_context(|| format!("running {bin}"))?;
    if !out.status.success() {
        bail!("{bin} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Whether this family's nat table can be used here (IPv6 may be off in the pod).
fn usable(bin: &str) -> bool {
    run(bin, &["-t", "nat", "-S", "OUTPUT"]).unwrap_or(false)
}

/// Installs (or refreshes) the rules for both families.
pub fn install(capture: &Capture, backend: Backend) -> anyhow::Result<()> {
    for family in [Family::V4, Family::V6] {
        let (bin, restore) = backend.bins(family);
        if !usable(&bin) {
            if family == Family::V4 {
                bail!("{bin} cannot read the nat table: it needs root (NET_ADMIN and NET_RAW) and iptables installed");
            }
            tracing::warn!("{bin} unavailable: IPv6 is not captured");
            continue;
        }
        let mut child = Command::new(&restore)
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {restore}"))?;
        child.stdin.take().context("stdin")?.write_all(capture.script(family).as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("{restore}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let check: Vec<&str> = ["-t", "nat", "-C", "OUTPUT"].into_iter().chain(JUMP).collect();
        if !run(&bin, &check)? {
            let append: Vec<&str> = ["-t", "nat", "-A", "OUTPUT"].into_iter().chain(JUMP).collect();
            must(&bin, &append)?;
        }
    }
    Ok(())
}

/// Deletes the jump and both chains; what is not there is skipped.
pub fn remove(backend: Backend) -> anyhow::Result<()> {
    for family in [Family::V4, Family::V6] {
        let (bin, _) = backend.bins(family);
        if !usable(&bin) {
            continue;
        }
        let delete: Vec<&str> = ["-t", "nat", "-D", "OUTPUT"].into_iter().chain(JUMP).collect();
        while run(&bin, &delete)? {}
        for chain in [OUTPUT_CHAIN, REDIRECT_CHAIN] {
            if run(&bin, &["-t", "nat", "-F", chain])? {
                must(&bin, &["-t", "nat", "-X", chain])?;
            }
        }
    }
    Ok(())
}

/// What `--dry-run` prints: each family's restore input and the jump.
pub fn dry_run(capture: &Capture) -> String {
    let mut out = String::new();
    for (family, name) in [(Family::V4, "iptables"), (Family::V6, "ip6tables")] {
        out.push_str(&format!("# {name}-restore --noflush\n"));
        out.push_str(&capture.script(family));
        out.push_str(&format!("# {name} -t nat -A OUTPUT {} (unless present)\n", JUMP.join(" ")));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn capture() -> Capture {
        Capture {
            proxy_uid: 1337,
            redirect_port: 15081,
            ports: vec![80, 443],
            exclude_ports: vec![15080, 15090],
            exclude_cidrs: vec!["169.254.169.254".parse().unwrap(), "fd00::/8".parse().unwrap()],
            include_cidrs: vec![],
        }
    }

    #[test]
    fn dry_run_prints_both_families_rules() {
        let golden = include_str!("../tests/golden/redirect-dry-run.txt");
        assert_eq!(dry_run(&capture()), golden);
    }

    #[test]
    fn included_blocks_narrow_the_capture_to_their_family() {
        let c = Capture {
            ports: vec![443],
            include_cidrs: vec!["203.0.113.0/24".parse().unwrap(), "2001:db8::/32".parse().unwrap()],
            ..capture()
        };
        let v4 = c.script(Family::V4);
        assert!(v4.contains("-A BULWARK_OUTPUT -d 203.0.113.0/24 -p tcp --dport 443 -j BULWARK_REDIRECT\n"), "{v4}");
        assert!(!v4.contains("2001:db8"), "{v4}");
        assert!(!v4.contains("fd00::/8"), "{v4}");
        let v6 = c.script(Family::V6);
        assert!(v6.contains("-A BULWARK_OUTPUT -d 2001:db8::/32 -p tcp --dport 443 -j BULWARK_REDIRECT\n"), "{v6}");
        assert!(v6.contains("-A BULWARK_OUTPUT -d ::1/128 -j RETURN\n"), "{v6}");
    }

    #[test]
    fn address_blocks_are_read_strictly() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().to_string(), "10.0.0.0/8");
        assert_eq!("10.1.2.3".parse::<Cidr>().unwrap().to_string(), "10.1.2.3/32");
        assert_eq!("::1".parse::<Cidr>().unwrap().to_string(), "::1/128");
        assert!("10.0.0.0/33".parse::<Cidr>().unwrap_err().contains("at most 32"));
        assert!("example.com".parse::<Cidr>().is_err());
        assert!("10.0.0.0/x".parse::<Cidr>().is_err());
    }
}
