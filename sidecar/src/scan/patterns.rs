//! User-given patterns: regular expressions, and banned substrings (case-insensitive by
//! default, optionally on word boundaries), matched with Aho-Corasick in one pass.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use regex::Regex;

use super::{Detector, Finding};

pub struct Patterns {
    regexes: Vec<Regex>,
}

impl Patterns {
    pub fn new(patterns: &[String]) -> Result<Self, String> {
        let regexes = patterns
            .iter()
            .map(|p| Regex::new(p).map_err(|e| format!("pattern {p:?}: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Self { regexes })
    }
}

impl Detector for Patterns {
    fn detect(&self, text: &str) -> Result<Vec<Finding>, String> {
        let mut out: Vec<Finding> = vec![];
        for re in &self.regexes {
            for m in re.find_iter(text).filter(|m| !m.is_empty()) {
                if !out.iter().any(|f| m.start() < f.end && f.start < m.end()) {
                    out.push(Finding::span(m.start(), m.end(), "pattern"));
                }
            }
        }
        out.sort_by_key(|f| f.start);
        Ok(out)
    }
}

pub struct Substrings {
    ac: AhoCorasick,
    word_boundary: bool,
}

impl Substrings {
    pub fn new(substrings: &[String], case_sensitive: bool, word_boundary: bool) -> Result<Self, String> {
        let needles: Vec<&String> = substrings.iter().filter(|s| !s.is_empty()).collect();
        let ac = AhoCorasickBuilder::new()
            .ascii_case_insensitive(!case_sensitive)
            .match_kind(MatchKind::LeftmostLongest)
            .build(needles)
            .map_err(|e| e.to_string())?;
        Ok(Self { ac, word_boundary })
    }
}

impl Detector for Substrings {
    fn detect(&self, text: &str) -> Result<Vec<Finding>, String> {
        let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        Ok(self
            .ac
            .find_iter(text)
            .filter(|m| {
                !self.word_boundary
                    || (!word(text[..m.start()].chars().next_back()) && !word(text[m.end()..].chars().next()))
            })
            .map(|m| Finding::span(m.start(), m.end(), "substring"))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regexes_and_substrings() {
        let p = Patterns::new(&["(?i)project[- ]falcon".into()]).unwrap();
        assert_eq!(p.detect("about Project Falcon and project-falcon").unwrap().len(), 2);
        let s = Substrings::new(&["BEGIN PRIVATE KEY".into(), "cat".into()], false, false).unwrap();
        assert_eq!(s.detect("-----begin private key----- concatenate").unwrap().len(), 2);
        let words = Substrings::new(&["cat".into()], false, true).unwrap();
        assert_eq!(words.detect("concatenate the Cat, cat_x").unwrap().len(), 1);
        let exact = Substrings::new(&["Cat".into()], true, false).unwrap();
        assert_eq!(exact.detect("cat Cat").unwrap().len(), 1);
    }
}
