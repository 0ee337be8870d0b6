//! Model-based output scanners on a stream. The stream guard releases redacted bytes; here they
//! wait until the model scanners have judged the answer text in them, a piece at a time: a piece
//! is judged once a sentence ended in it after `MIN_PIECE` characters, or at `MAX_PIECE`
//! characters, or at the end of the stream, and is scored with the end of the piece before it as context.
//! One judgement runs at a time per stream, so the inference rate is bounded by the model
//! itself: text that arrives meanwhile joins the next piece. No byte leaves before the text in
//! it was judged; a block ends the stream instead.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use tokio::task::JoinHandle;

use super::{Blocked, Ctx, Direction, PolicyRuntime, run_models};
use crate::metrics::Metrics;

/// A piece is judged at its first sentence end after this many characters...
pub const MIN_PIECE: usize = 48;
/// ...or at this many, whichever comes first.
pub const MAX_PIECE: usize = 512;
/// Characters of the piece before that are scored with a piece.
const CONTEXT: usize = 128;

pub struct StreamJudge {
    policy: Arc<PolicyRuntime>,
    models: Arc<[usize]>,
    metrics: Arc<Metrics>,
    route: Arc<str>,
    backend: Arc<str>,
    mirrored: bool,
    /// Bytes released by the guard whose text is not judged yet, and that text.
    waiting: Vec<u8>,
    text: String,
    /// The end of the text judged last.
    context: String,
    /// The judgement running, and the bytes it clears.
    running: Option<(Bytes, JoinHandle<Result<(), Blocked>>)>,
    /// The stream ended: what waits is judged however short.
    ended: bool,
}

impl StreamJudge {
    /// A judge for the policy's sampled model-based output scanners; none when there are none.
    pub fn new(
        policy: Arc<PolicyRuntime>,
        metrics: Arc<Metrics>,
        route: &str,
        backend: &str,
        mirrored: bool,
    ) -> Option<Self> {
        let models = policy.sampled_models(Direction::Output);
        (!models.is_empty()).then(|| Self {
            policy,
            models: models.into(),
            metrics,
            route: route.into(),
            backend: backend.into(),
            mirrored,
            waiting: vec![],
            text: String::new(),
            context: String::new(),
            running: None,
            ended: false,
        })
    }

    /// Bytes the guard released, and the answer text in them.
    pub fn push(&mut self, bytes: &[u8], text: &str) {
        self.waiting.extend_from_slice(bytes);
        self.text.push_str(text);
    }

    /// The upstream ended: what waits is judged as the last piece.
    pub fn end(&mut self) {
        self.ended = true;
    }

    /// Bytes cleared to go to the client (`Ready(None)`: nothing to clear now and nothing
    /// running), or why the stream is blocked.
    pub fn poll_cleared(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Blocked>>> {
        if let Some((cleared, handle)) = &mut self.running {
            let verdict = match std::pin::Pin::new(handle).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(verdict)) => verdict,
                Poll::Ready(Err(e)) => Err(Blocked {
                    policy: self.policy.name.clone(),
                    scanner: "stream",
                    reason: format!("the judgement of a streamed piece failed: {e}"),
                }),
            };
            let cleared = std::mem::take(cleared);
            self.running = None;
            return Poll::Ready(Some(verdict.map(|()| cleared)));
        }
        if self.waiting.is_empty() {
            return Poll::Ready(None);
        }
        if self.text.trim().is_empty() {
            // No answer text (a role, a tool call, the end marker): nothing to judge.
            self.text.clear();
            return Poll::Ready(Some(Ok(Bytes::from(std::mem::take(&mut self.waiting)))));
        }
        if !(self.ended || piece_ends(&self.text)) {
            return Poll::Ready(None);
        }
        self.start();
        self.poll_cleared(cx)
    }

    /// Starts judging the waiting text; its bytes go out when it passes.
    fn start(&mut self) {
        let piece = std::mem::take(&mut self.text);
        let bytes = Bytes::from(std::mem::take(&mut self.waiting));
        let scored = format!("{}{piece}", self.context);
        self.context = last_chars(&piece, CONTEXT).to_owned();
        let (policy, models, metrics) = (self.policy.clone(), self.models.clone(), self.metrics.clone());
        let (route, backend, mirrored) = (self.route.clone(), self.backend.clone(), self.mirrored);
        let handle = tokio::spawn(async move {
            let ctx = Ctx { metrics: &metrics, route: &route, backend: Some(&backend), mirrored };
            run_models(&policy, Direction::Output, &models, &[scored], None, &ctx).await
        });
        self.running = Some((bytes, handle));
    }
}

impl Drop for StreamJudge {
    /// The client went away: the judgement is of no use any more.
    fn drop(&mut self) {
        if let Some((_, handle)) = &self.running {
            handle.abort();
        }
    }
}

/// Whether the text so far makes a piece: a sentence ended in it after `MIN_PIECE` characters,
/// or `MAX_PIECE` characters came.
fn piece_ends(text: &str) -> bool {
    let chars = text.chars().count();
    if chars >= MAX_PIECE {
        return true;
    }
    if chars < MIN_PIECE {
        return false;
    }
    let chars: Vec<char> = text.chars().collect();
    let ends = |i: usize| match chars[i] {
        '\n' | '。' | '！' | '？' => true,
        '.' | '!' | '?' => chars.get(i + 1).is_none_or(|c| c.is_whitespace()),
        _ => false,
    };
    (MIN_PIECE - 1..chars.len()).any(ends)
}

fn last_chars(text: &str, n: usize) -> &str {
    let count = text.chars().count();
    text.char_indices().nth(count.saturating_sub(n)).map_or("", |(i, _)| &text[i..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_end_at_sentences_or_at_the_maximum() {
        assert!(!piece_ends("Short. "), "too short to judge alone");
        let sentence = "This is a sentence that is long enough to be judged.";
        assert!(piece_ends(sentence) && piece_ends(&format!("{sentence} ")));
        assert!(piece_ends(&format!("{sentence} And another one sta")), "a sentence ended in it");
        assert!(!piece_ends("A long clause without any end, version 3.14 of it, and on"), "not a sentence end");
        assert!(piece_ends(&"word ".repeat(MAX_PIECE / 5 + 1)));
        assert_eq!(last_chars("héllo", 3), "llo");
        assert_eq!(last_chars("hi", 5), "hi");
    }
}
