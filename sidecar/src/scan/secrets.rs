//! Secrets in text: cloud keys, source-host and SaaS tokens, LLM provider keys, private keys,
//! JWTs, credentials in URLs, and high-entropy values assigned to secret-sounding names.

use regex::Regex;

use super::{Detector, Finding};

struct Rule {
    kind: &'static str,
    re: Regex,
    /// Capture group holding the secret (0: the whole match).
    group: usize,
    /// Minimum Shannon entropy (bits per char) of the secret, for generic rules.
    min_entropy: f64,
}

pub struct Secrets {
    rules: Vec<Rule>,
}

const RULES: &[(&str, &str, usize, f64)] = &[
    (
        "private-key",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----(?s:.*?)(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\z)",
        0,
        0.0,
    ),
    ("aws-access-key-id", r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b", 0, 0.0),
    ("aws-secret-access-key", r#"(?i)aws.{0,20}?(?:secret|sk).{0,20}?['"=:\s]+([A-Za-z0-9/+]{40})\b"#, 1, 3.0),
    ("gcp-api-key", r"\bAIza[0-9A-Za-z_\-]{35}\b", 0, 0.0),
    ("azure-storage-key", r"(?i)AccountKey=([A-Za-z0-9+/]{86}==)", 1, 0.0),
    ("github-token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{60,255})\b", 0, 0.0),
    ("gitlab-token", r"\bgl(?:pat|dt|ptt|rt)-[A-Za-z0-9_\-]{20,}\b", 0, 0.0),
    ("slack-token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b", 0, 0.0),
    ("slack-webhook", r"https://hooks\.slack\.com/(?:services|workflows)/[A-Za-z0-9+/]{20,}", 0, 0.0),
    ("stripe-key", r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}\b", 0, 0.0),
    ("anthropic-key", r"\bsk-ant-[A-Za-z0-9_\-]{20,}", 0, 0.0),
    ("openai-key", r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}", 0, 0.0),
    ("jwt", r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}", 0, 0.0),
    (
        "url-credentials",
        r"\b[a-zA-Z][a-zA-Z0-9+.\-]{1,20}://[^\s:/@'\x22]{1,64}:([^\s:/@'\x22]{3,128})@[A-Za-z0-9.\-]+",
        1,
        0.0,
    ),
    (
        "generic-secret",
        r#"(?i)\b(?:api[_-]?key|apikey|secret(?:[_-]?key)?|access[_-]?(?:key|token)|auth[_-]?token|client[_-]?secret|password|passwd|pwd|token)\b["']?\s*[:=]\s*["']?([A-Za-z0-9_\-+/=.!@#$%^&*]{12,})"#,
        1,
        3.2,
    ),
];

impl Secrets {
    pub fn new() -> Result<Self, String> {
        let rules = RULES
            .iter()
            .map(|(kind, pat, group, min_entropy)| {
                Regex::new(pat)
                    .map(|re| Rule { kind, re, group: *group, min_entropy: *min_entropy })
                    .map_err(|e| format!("{kind}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { rules })
    }
}

/// Shannon entropy in bits per character.
pub fn entropy(s: &str) -> f64 {
    let mut counts = [0u32; 256];
    let bytes = s.as_bytes();
    for b in bytes {
        counts[*b as usize] += 1;
    }
    let n = bytes.len() as f64;
    counts.iter().filter(|c| **c > 0).map(|c| *c as f64 / n).map(|p| -p * p.log2()).sum()
}

impl Detector for Secrets {
    fn detect(&self, text: &str) -> Result<Vec<Finding>, String> {
        let mut out: Vec<Finding> = vec![];
        for rule in &self.rules {
            for caps in rule.re.captures_iter(text) {
                let Some(m) = caps.get(rule.group) else { continue };
                if rule.min_entropy > 0.0 && entropy(m.as_str()) < rule.min_entropy {
                    continue;
                }
                // Earlier (more specific) rules win overlaps: an Anthropic key is not also an OpenAI key.
                if out.iter().any(|f| m.start() < f.end && f.start < m.end()) {
                    continue;
                }
                out.push(Finding::span(m.start(), m.end(), rule.kind));
            }
        }
        out.sort_by_key(|f| f.start);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<&'static str> {
        Secrets::new().unwrap().detect(text).unwrap().into_iter().map(|f| f.kind).collect()
    }

    #[test]
    fn finds_each_kind() {
        let cases = [
            ("key AKIAIOSFODNN7EXAMPLE here", "aws-access-key-id"),
            ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws-secret-access-key"),
            ("AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe", "gcp-api-key"),
            ("ghp_0123456789abcdefghijklmnopqrstuvwxyzAB", "github-token"),
            ("glpat-abcdefghij0123456789", "gitlab-token"),
            ("xoxb-1234567890-abcdefghij", "slack-token"),
            ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", "stripe-key"),
            ("sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123", "anthropic-key"),
            ("sk-proj-abcdefghijklmnopqrstuvwxyz0123", "openai-key"),
            ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "jwt"),
            ("postgres://admin:hunter2secret@db.internal:5432/app", "url-credentials"),
            ("password = 'Zq8#kL2!vR9@pX4m'", "generic-secret"),
            ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "private-key"),
        ];
        for (text, kind) in cases {
            assert_eq!(kinds(text), [kind], "{text}");
        }
    }

    #[test]
    fn ordinary_text_is_left_alone() {
        for text in [
            "The password policy requires twelve characters.",
            "token = aaaaaaaaaaaaaaaa",
            "Use sk- as a prefix for keys",
            "visit https://example.com/path?x=1",
            "AKIA is a prefix",
        ] {
            assert!(kinds(text).is_empty(), "{text}: {:?}", kinds(text));
        }
    }

    #[test]
    fn a_private_key_cut_off_is_redacted_to_the_end() {
        let f = Secrets::new().unwrap().detect("here: -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg").unwrap();
        assert_eq!((f[0].start, f[0].end), (6, 48));
    }
}
