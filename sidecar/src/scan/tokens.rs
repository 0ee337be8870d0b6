//! Token limits with OpenAI's real encodings (`cl100k_base`, `o200k_base`), bundled, offline.

use tiktoken_rs::CoreBPE;

use super::{Detector, Finding};

pub struct TokenLimit {
    bpe: &'static CoreBPE,
    max: usize,
}

impl TokenLimit {
    pub fn new(encoding: Option<&str>, max: u32) -> Result<Self, String> {
        let bpe = match encoding.unwrap_or("o200k_base") {
            "cl100k_base" => tiktoken_rs::cl100k_base_singleton(),
            "o200k_base" => tiktoken_rs::o200k_base_singleton(),
            other => return Err(format!("unknown encoding {other:?}")),
        };
        Ok(Self { bpe, max: max as usize })
    }

    pub fn count(&self, text: &str) -> usize {
        self.bpe.encode_with_special_tokens(text).len()
    }
}

impl Detector for TokenLimit {
    fn detect(&self, text: &str) -> Result<Vec<Finding>, String> {
        // Every token covers at least one byte, so a short text cannot exceed the limit.
        if text.len() <= self.max {
            return Ok(vec![]);
        }
        let n = self.count(text);
        Ok(if n > self.max { vec![Finding::whole(text, "too-many-tokens", n as f32)] } else { vec![] })
    }

    fn whole_request(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_with_real_encodings() {
        let t = TokenLimit::new(Some("cl100k_base"), 5).unwrap();
        assert_eq!(t.count("hello world"), 2);
        assert!(t.detect("hello world").unwrap().is_empty());
        assert_eq!(t.detect("one two three four five six seven").unwrap()[0].kind, "too-many-tokens");
        assert_eq!(TokenLimit::new(Some("o200k_base"), 1).unwrap().count("tiktoken is great!"), 6);
    }
}
