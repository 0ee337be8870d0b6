//! Object metadata: typed access to `metadata` fields, timestamps, uids and name rules.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// Every field of `ObjectMeta`; anything else under `metadata` is an unknown field.
const OBJECT_META_FIELDS: &[&str] = &[
    "annotations",
    "creationTimestamp",
    "deletionGracePeriodSeconds",
    "deletionTimestamp",
    "finalizers",
    "generateName",
    "generation",
    "labels",
    "managedFields",
    "name",
    "namespace",
    "ownerReferences",
    "resourceVersion",
    "selfLink",
    "uid",
];

/// Returns `value` as a JSON object, first replacing it with an empty one if it is anything else.
pub fn object_mut(value: &mut Value) -> &mut Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => {
            *other = Value::Object(Map::new());
            object_mut(other)
        }
    }
}

/// The `metadata` object of `obj`, created when missing.
pub fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    object_mut(object_mut(obj).entry("metadata").or_insert(Value::Null))
}

/// The string at a JSON pointer, or `""` when absent or not a string.
pub fn str_at<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

pub fn name(obj: &Value) -> &str {
    str_at(obj, "/metadata/name")
}

pub fn namespace(obj: &Value) -> &str {
    str_at(obj, "/metadata/namespace")
}

pub fn uid(obj: &Value) -> &str {
    str_at(obj, "/metadata/uid")
}

pub fn resource_version(obj: &Value) -> &str {
    str_at(obj, "/metadata/resourceVersion")
}

pub fn labels(obj: &Value) -> Option<&Map<String, Value>> {
    obj.pointer("/metadata/labels").and_then(Value::as_object)
}

/// The object's finalizers.
pub fn finalizers(obj: &Value) -> Vec<&str> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map_or_else(Vec::new, |list| list.iter().filter_map(Value::as_str).collect())
}

/// Whether deletion was requested and the object only waits for its finalizers.
pub fn is_deleting(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp").is_some_and(|v| !v.is_null())
}

/// The uids of the object's owners.
pub fn owner_uids(obj: &Value) -> Vec<&str> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map_or_else(Vec::new, |refs| refs.iter().filter_map(|r| r.get("uid").and_then(Value::as_str)).collect())
}

/// Removes the fields under `metadata` that `ObjectMeta` does not have, returning their paths.
pub fn prune_unknown_metadata(obj: &mut Value) -> Vec<String> {
    let Some(Value::Object(meta)) = obj.get_mut("metadata") else { return Vec::new() };
    let unknown: Vec<String> = meta.keys().filter(|k| !OBJECT_META_FIELDS.contains(&k.as_str())).cloned().collect();
    for key in &unknown {
        meta.remove(key);
    }
    unknown.into_iter().map(|k| format!("metadata.{k}")).collect()
}

/// The current time in the RFC 3339 form Kubernetes uses (`2024-05-01T12:00:00Z`).
pub fn now() -> String {
    rfc3339(SystemTime::now())
}

/// Formats `time` as RFC 3339 in UTC with second precision.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The proleptic Gregorian date of a count of days since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A random (version 4) UUID.
pub fn new_uid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// `prefix` followed by five random characters, as for `metadata.generateName`.
pub fn generated_name(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let suffix: String = (0..5).map(|_| char::from(ALPHABET[rand::random_range(0..ALPHABET.len())])).collect();
    format!("{prefix}{suffix}")
}

/// Why `name` is not a lowercase RFC 1123 subdomain, the rule for most object names.
pub fn subdomain_error(name: &str) -> Option<String> {
    let valid = name.len() <= 253 && name.split('.').all(is_label);
    (!valid).then(|| {
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must \
         start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is \
         '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
            .to_string()
    })
}

/// Why `name` is not a lowercase RFC 1123 label, the rule for namespace names.
pub fn label_error(name: &str) -> Option<String> {
    (!is_label(name)).then(|| {
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and \
         end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is \
         '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
            .to_string()
    })
}

fn is_label(part: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=63).contains(&part.len())
        && part.chars().all(|c| alnum(c) || c == '-')
        && part.starts_with(alnum)
        && part.ends_with(alnum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(1_709_210_096)), "2024-02-29T12:34:56Z");
    }

    #[test]
    fn checks_names() {
        assert!(subdomain_error("support-chat.v2").is_none());
        assert!(subdomain_error("Support").is_some());
        assert!(subdomain_error("-x").is_some());
        assert!(label_error("team-a").is_none());
        assert!(label_error("team.a").is_some());
        assert_eq!(generated_name("web-").len(), 9);
        assert_eq!(new_uid().len(), 36);
    }
}
