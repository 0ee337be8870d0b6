//! Personal data: email addresses, phone numbers, payment cards (Luhn-checked), IBANs
//! (mod-97-checked), US social security numbers and IP addresses.

use std::net::{Ipv4Addr, Ipv6Addr};

use regex::Regex;

use super::{Detector, Finding};

pub struct Pii {
    entities: Vec<(&'static str, Regex)>,
}

const PATTERNS: &[(&str, &str)] = &[
    ("email", r"[\p{L}\p{N}._%+\-]+@[\p{L}\p{N}\-]+(?:\.[\p{L}\p{N}\-]+)*\.\p{L}{2,}\b"),
    ("creditCard", r"\b\d(?:[ \-]?\d){12,18}\b"),
    ("iban", r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"),
    ("ssn", r"\b\d{3}-\d{2}-\d{4}\b"),
    (
        "phone",
        r"\+\d{1,3}[ .\-]?(?:\(\d{1,4}\)[ .\-]?)?\d{2,4}(?:[ .\-]?\d{2,4}){1,4}\b|\(\d{3}\)[ .\-]?\d{3}[ .\-]\d{4}\b|\b\d{3}[.\-]\d{3}[.\-]\d{4}\b",
    ),
    ("ipAddress", r"\b(?:\d{1,3}\.){3}\d{1,3}\b|(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}"),
];

impl Pii {
    /// `entities` as in the policy (`email`, `phone`, ...); empty means all.
    pub fn new(entities: &[String]) -> Result<Self, String> {
        let entities = PATTERNS
            .iter()
            .filter(|(name, _)| entities.is_empty() || entities.iter().any(|e| e == name))
            .map(|(name, pat)| Regex::new(pat).map(|re| (*name, re)).map_err(|e| format!("{name}: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Self { entities })
    }
}

pub fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(*d);
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

pub fn iban_valid(s: &str) -> bool {
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let rearranged = compact[4..].chars().chain(compact[..4].chars());
    let mut rem: u32 = 0;
    for c in rearranged {
        let v = match c {
            '0'..='9' => c as u32 - '0' as u32,
            'A'..='Z' => c as u32 - 'A' as u32 + 10,
            _ => return false,
        };
        rem = if v >= 10 { (rem * 100 + v) % 97 } else { (rem * 10 + v) % 97 };
    }
    rem == 1
}

fn valid(kind: &str, m: &str) -> bool {
    match kind {
        "creditCard" => {
            let digits: Vec<u8> = m.bytes().filter(u8::is_ascii_digit).map(|b| b - b'0').collect();
            (13..=19).contains(&digits.len()) && luhn(&digits) && digits.iter().any(|d| *d != digits[0])
        }
        "iban" => iban_valid(m),
        "ssn" => {
            let (area, rest) = m.split_at(3);
            area != "000" && area != "666" && !area.starts_with('9') && &rest[1..3] != "00" && &rest[4..] != "0000"
        }
        "ipAddress" => {
            if m.contains(':') {
                m.matches(':').count() >= 2 && m.parse::<Ipv6Addr>().is_ok() && m != "::"
            } else {
                m.parse::<Ipv4Addr>().is_ok()
            }
        }
        "phone" => m.bytes().filter(u8::is_ascii_digit).count() >= 9,
        _ => true,
    }
}

impl Detector for Pii {
    fn detect(&self, text: &str) -> Result<Vec<Finding>, String> {
        let mut out: Vec<Finding> = vec![];
        for (kind, re) in &self.entities {
            for m in re.find_iter(text) {
                if !valid(kind, m.as_str()) || out.iter().any(|f| m.start() < f.end && f.start < m.end()) {
                    continue;
                }
                out.push(Finding::span(m.start(), m.end(), kind));
            }
        }
        out.sort_by_key(|f| f.start);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(text: &str) -> Vec<(&'static str, String)> {
        Pii::new(&[])
            .unwrap()
            .detect(text)
            .unwrap()
            .into_iter()
            .map(|f| (f.kind, text[f.start..f.end].to_owned()))
            .collect()
    }

    #[test]
    fn finds_valid_entities_only() {
        assert_eq!(
            found("mail ann.lee+x@mail.example.co.uk now"),
            [("email", "ann.lee+x@mail.example.co.uk".to_owned())]
        );
        assert_eq!(found("card 4111 1111 1111 1111."), [("creditCard", "4111 1111 1111 1111".to_owned())]);
        assert!(found("card 4111 1111 1111 1112").is_empty(), "Luhn fails");
        assert_eq!(found("IBAN DE89 3704 0044 0532 0130 00"), [("iban", "DE89 3704 0044 0532 0130 00".to_owned())]);
        assert!(found("IBAN DE88 3704 0044 0532 0130 00").is_empty(), "checksum fails");
        assert_eq!(found("ssn 123-45-6789"), [("ssn", "123-45-6789".to_owned())]);
        assert!(found("ssn 666-45-6789").is_empty());
        assert_eq!(found("call +1 415 555 0132 today"), [("phone", "+1 415 555 0132".to_owned())]);
        assert_eq!(
            found("or (415) 555-0132, 415-555-0199"),
            [("phone", "(415) 555-0132".to_owned()), ("phone", "415-555-0199".to_owned())]
        );
        assert_eq!(found("+44 20 7946 0958"), [("phone", "+44 20 7946 0958".to_owned())]);
        assert_eq!(found("host 192.168.10.1 up"), [("ipAddress", "192.168.10.1".to_owned())]);
        assert_eq!(found("v6 2001:db8::8a2e:370:7334 up"), [("ipAddress", "2001:db8::8a2e:370:7334".to_owned())]);
        assert!(
            found("version 1.2.3.4000 and 10:30 and 3.14").is_empty(),
            "{:?}",
            found("version 1.2.3.4000 and 10:30 and 3.14")
        );
    }

    #[test]
    fn unicode_around_entities() {
        assert_eq!(found("Grüße an jürgen@exämple.de — danke"), [("email", "jürgen@exämple.de".to_owned())]);
    }
}
