//! Decoding of `application/vnd.kubernetes.protobuf` request bodies into JSON.
//!
//! kubectl's typed clients send protobuf (`kubectl create configmap|secret|namespace|
//! serviceaccount|service|token`). The kinds those commands create are understood; other kinds
//! are refused with 415. Responses are always JSON, which those clients accept too.

use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};

/// The prefix of every Kubernetes protobuf message.
const MAGIC: &[u8] = b"k8s\0";
/// `time.Time{}` in seconds since the Unix epoch: an unset timestamp.
const ZERO_TIME_SECONDS: i64 = -62_135_596_800;

/// How a field is encoded and shown in JSON. Scalars are left out when they hold their zero
/// value, as Go's `omitempty` does, except for the `Optional*` ones (Go pointers).
#[derive(Clone, Copy)]
enum Kind {
    String,
    Int,
    Bool,
    OptionalBool,
    Time,
    IntOrString,
    Message(&'static [Field]),
    StringMap,
    BytesMap,
    FieldsV1,
}

/// A message field: number, JSON name, kind, and whether it is repeated.
type Field = (u32, &'static str, Kind, bool);

const OBJECT_META: &[Field] = &[
    (1, "name", Kind::String, false),
    (2, "generateName", Kind::String, false),
    (3, "namespace", Kind::String, false),
    (5, "uid", Kind::String, false),
    (6, "resourceVersion", Kind::String, false),
    (7, "generation", Kind::Int, false),
    (8, "creationTimestamp", Kind::Time, false),
    (9, "deletionTimestamp", Kind::Time, false),
    (10, "deletionGracePeriodSeconds", Kind::Int, false),
    (11, "labels", Kind::StringMap, false),
    (12, "annotations", Kind::StringMap, false),
    (13, "ownerReferences", Kind::Message(OWNER_REFERENCE), true),
    (14, "finalizers", Kind::String, true),
    (17, "managedFields", Kind::Message(MANAGED_FIELDS_ENTRY), true),
];
const OWNER_REFERENCE: &[Field] = &[
    (5, "apiVersion", Kind::String, false),
    (1, "kind", Kind::String, false),
    (3, "name", Kind::String, false),
    (4, "uid", Kind::String, false),
    (6, "controller", Kind::OptionalBool, false),
    (7, "blockOwnerDeletion", Kind::OptionalBool, false),
];
const MANAGED_FIELDS_ENTRY: &[Field] = &[
    (1, "manager", Kind::String, false),
    (2, "operation", Kind::String, false),
    (3, "apiVersion", Kind::String, false),
    (4, "time", Kind::Time, false),
    (6, "fieldsType", Kind::String, false),
    (7, "fieldsV1", Kind::FieldsV1, false),
    (8, "subresource", Kind::String, false),
];
const CONFIG_MAP: &[Field] = &[
    (1, "metadata", Kind::Message(OBJECT_META), false),
    (2, "data", Kind::StringMap, false),
    (3, "binaryData", Kind::BytesMap, false),
    (4, "immutable", Kind::OptionalBool, false),
];
const SECRET: &[Field] = &[
    (1, "metadata", Kind::Message(OBJECT_META), false),
    (2, "data", Kind::BytesMap, false),
    (3, "type", Kind::String, false),
    (4, "stringData", Kind::StringMap, false),
    (5, "immutable", Kind::OptionalBool, false),
];
const NAMESPACE: &[Field] = &[
    (1, "metadata", Kind::Message(OBJECT_META), false),
    (2, "spec", Kind::Message(&[(1, "finalizers", Kind::String, true)]), false),
];
const OBJECT_REFERENCE: &[Field] = &[
    (1, "kind", Kind::String, false),
    (2, "namespace", Kind::String, false),
    (3, "name", Kind::String, false),
    (4, "uid", Kind::String, false),
    (5, "apiVersion", Kind::String, false),
    (6, "resourceVersion", Kind::String, false),
    (7, "fieldPath", Kind::String, false),
];
const SERVICE_ACCOUNT: &[Field] = &[
    (1, "metadata", Kind::Message(OBJECT_META), false),
    (2, "secrets", Kind::Message(OBJECT_REFERENCE), true),
    (3, "imagePullSecrets", Kind::Message(&[(1, "name", Kind::String, false)]), true),
    (4, "automountServiceAccountToken", Kind::OptionalBool, false),
];
const SERVICE_PORT: &[Field] = &[
    (1, "name", Kind::String, false),
    (2, "protocol", Kind::String, false),
    (6, "appProtocol", Kind::String, false),
    (3, "port", Kind::Int, false),
    (4, "targetPort", Kind::IntOrString, false),
    (5, "nodePort", Kind::Int, false),
];
const SERVICE_SPEC: &[Field] = &[
    (1, "ports", Kind::Message(SERVICE_PORT), true),
    (2, "selector", Kind::StringMap, false),
    (3, "clusterIP", Kind::String, false),
    (18, "clusterIPs", Kind::String, true),
    (4, "type", Kind::String, false),
    (5, "externalIPs", Kind::String, true),
    (7, "sessionAffinity", Kind::String, false),
    (8, "loadBalancerIP", Kind::String, false),
    (9, "loadBalancerSourceRanges", Kind::String, true),
    (10, "externalName", Kind::String, false),
    (11, "externalTrafficPolicy", Kind::String, false),
    (12, "healthCheckNodePort", Kind::Int, false),
    (13, "publishNotReadyAddresses", Kind::Bool, false),
    (19, "ipFamilies", Kind::String, true),
    (17, "ipFamilyPolicy", Kind::String, false),
    (20, "allocateLoadBalancerNodePorts", Kind::OptionalBool, false),
    (21, "loadBalancerClass", Kind::String, false),
    (22, "internalTrafficPolicy", Kind::String, false),
    (23, "trafficDistribution", Kind::String, false),
];
const SERVICE: &[Field] =
    &[(1, "metadata", Kind::Message(OBJECT_META), false), (2, "spec", Kind::Message(SERVICE_SPEC), false)];
const TOKEN_REQUEST: &[Field] = &[
    (1, "metadata", Kind::Message(OBJECT_META), false),
    (
        2,
        "spec",
        Kind::Message(&[
            (1, "audiences", Kind::String, true),
            (4, "expirationSeconds", Kind::Int, false),
            (
                3,
                "boundObjectRef",
                Kind::Message(&[
                    (1, "kind", Kind::String, false),
                    (2, "apiVersion", Kind::String, false),
                    (3, "name", Kind::String, false),
                    (4, "uid", Kind::String, false),
                ]),
                false,
            ),
        ]),
        false,
    ),
];

fn message_for(api_version: &str, kind: &str) -> Option<&'static [Field]> {
    Some(match (api_version, kind) {
        ("v1", "ConfigMap") => CONFIG_MAP,
        ("v1", "Secret") => SECRET,
        ("v1", "Namespace") => NAMESPACE,
        ("v1", "ServiceAccount") => SERVICE_ACCOUNT,
        ("v1", "Service") => SERVICE,
        ("authentication.k8s.io/v1", "TokenRequest") => TOKEN_REQUEST,
        _ => return None,
    })
}

/// One field as found on the wire.
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

fn varint(buf: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first().ok_or("truncated varint")?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint too long".into())
}

/// The fields of a message, in wire order.
fn fields(mut buf: &[u8]) -> Result<Vec<(u32, Wire<'_>)>, String> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let number = u32::try_from(key >> 3).map_err(|_| "bad field number")?;
        let wire = match key & 7 {
            0 => Wire::Varint(varint(&mut buf)?),
            2 => {
                let len = usize::try_from(varint(&mut buf)?).map_err(|_| "bad length")?;
                if len > buf.len() {
                    return Err("truncated field".into());
                }
                let (bytes, rest) = buf.split_at(len);
                buf = rest;
                Wire::Bytes(bytes)
            }
            wire @ (1 | 5) => {
                let len = if wire == 1 { 8 } else { 4 };
                buf = buf.get(len..).ok_or("truncated field")?;
                Wire::Fixed
            }
            other => return Err(format!("unsupported wire type {other}")),
        };
        out.push((number, wire));
    }
    Ok(out)
}

fn text(bytes: &[u8]) -> Value {
    Value::String(String::from_utf8_lossy(bytes).into_owned())
}

/// The key and value of a map entry message.
fn entry(bytes: &[u8]) -> Result<(String, &[u8]), String> {
    let (mut key, mut value) = (String::new(), &[][..]);
    for (number, wire) in fields(bytes)? {
        match (number, wire) {
            (1, Wire::Bytes(b)) => key = String::from_utf8_lossy(b).into_owned(),
            (2, Wire::Bytes(b)) => value = b,
            _ => {}
        }
    }
    Ok((key, value))
}

/// Decodes one field value; `None` for zero values that JSON leaves out.
fn decode_value(kind: Kind, wire: &Wire<'_>) -> Result<Option<Value>, String> {
    let value = match (kind, wire) {
        (Kind::String, Wire::Bytes(b)) => (!b.is_empty()).then(|| text(b)),
        (Kind::Int, Wire::Varint(v)) => (*v != 0).then(|| json!(*v as i64)),
        (Kind::Bool, Wire::Varint(v)) => (*v != 0).then_some(Value::Bool(true)),
        (Kind::OptionalBool, Wire::Varint(v)) => Some(Value::Bool(*v != 0)),
        (Kind::Time, Wire::Bytes(b)) => {
            let mut seconds = 0i64;
            for (number, wire) in fields(b)? {
                if let (1, Wire::Varint(v)) = (number, wire) {
                    seconds = v as i64;
                }
            }
            (seconds != ZERO_TIME_SECONDS).then(|| {
                let time = match u64::try_from(seconds) {
                    Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
                    Err(_) => UNIX_EPOCH,
                };
                json!(crate::meta::rfc3339(time))
            })
        }
        (Kind::IntOrString, Wire::Bytes(b)) => {
            let (mut is_string, mut int, mut string) = (false, 0i64, Value::Null);
            for (number, wire) in fields(b)? {
                match (number, wire) {
                    (1, Wire::Varint(v)) => is_string = v == 1,
                    (2, Wire::Varint(v)) => int = v as i64,
                    (3, Wire::Bytes(s)) => string = text(s),
                    _ => {}
                }
            }
            Some(if is_string { string } else { json!(int) })
        }
        (Kind::Message(message), Wire::Bytes(b)) => Some(decode_message(b, message)?),
        (Kind::FieldsV1, Wire::Bytes(b)) => {
            let raw = fields(b)?.into_iter().find_map(|(n, w)| match (n, w) {
                (1, Wire::Bytes(raw)) => Some(raw),
                _ => None,
            });
            raw.map(|raw| serde_json::from_slice(raw).map_err(|e| e.to_string())).transpose()?
        }
        _ => return Err("a field has an unexpected wire type".into()),
    };
    Ok(value)
}

fn decode_message(bytes: &[u8], message: &[Field]) -> Result<Value, String> {
    let mut out = Map::new();
    for (number, wire) in fields(bytes)? {
        let Some(&(_, name, kind, repeated)) = message.iter().find(|f| f.0 == number) else { continue };
        match kind {
            Kind::StringMap | Kind::BytesMap => {
                let Wire::Bytes(b) = wire else { return Err(format!("{name}: not a map entry")) };
                let (key, value) = entry(b)?;
                let value = if matches!(kind, Kind::BytesMap) { json!(STANDARD.encode(value)) } else { text(value) };
                crate::meta::object_mut(out.entry(name).or_insert(Value::Null)).insert(key, value);
            }
            _ if repeated => {
                let item = decode_value(kind, &wire)?.unwrap_or_else(|| json!(""));
                match out.entry(name).or_insert_with(|| json!([])) {
                    Value::Array(items) => items.push(item),
                    other => *other = json!([item]),
                }
            }
            _ => {
                if let Some(value) = decode_value(kind, &wire)? {
                    out.insert(name.to_string(), value);
                }
            }
        }
    }
    Ok(Value::Object(out))
}

/// Decodes a protobuf request body (the `k8s\0` envelope around a `runtime.Unknown`).
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let envelope = body.strip_prefix(MAGIC).ok_or("the body does not start with the protobuf prefix")?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (number, wire) in fields(envelope)? {
        match (number, wire) {
            (1, Wire::Bytes(type_meta)) => {
                for (n, w) in fields(type_meta)? {
                    match (n, w) {
                        (1, Wire::Bytes(b)) => api_version = String::from_utf8_lossy(b).into_owned(),
                        (2, Wire::Bytes(b)) => kind = String::from_utf8_lossy(b).into_owned(),
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(b)) => raw = b,
            _ => {}
        }
    }
    let message = message_for(&api_version, &kind)
        .ok_or_else(|| format!("{api_version} {kind} is not understood in protobuf"))?;
    let mut obj = decode_message(raw, message)?;
    let fields = crate::meta::object_mut(&mut obj);
    fields.insert("apiVersion".into(), json!(api_version));
    fields.insert("kind".into(), json!(kind));
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint_bytes(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    fn bytes_field(number: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        varint_bytes(u64::from(number) << 3 | 2, &mut out);
        varint_bytes(payload.len() as u64, &mut out);
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn decodes_a_config_map() {
        let zero_time = {
            let mut t = vec![0x08];
            varint_bytes(ZERO_TIME_SECONDS as u64, &mut t);
            t
        };
        let metadata = [bytes_field(1, b"cfg"), bytes_field(2, b""), bytes_field(8, &zero_time)].concat();
        let data = [bytes_field(1, b"a"), bytes_field(2, b"b")].concat();
        let config_map = [bytes_field(1, &metadata), bytes_field(2, &data)].concat();
        let type_meta = [bytes_field(1, b"v1"), bytes_field(2, b"ConfigMap")].concat();
        let body = [MAGIC.to_vec(), bytes_field(1, &type_meta), bytes_field(2, &config_map)].concat();
        assert_eq!(
            decode(&body).unwrap(),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"a": "b"}})
        );
        assert!(decode(b"{}").is_err());
    }
}
