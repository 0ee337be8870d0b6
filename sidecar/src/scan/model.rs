//! Model-based scanners through ONNX Runtime (loaded dynamically): a sentence encoder and
//! sequence classifiers in Hugging Face's ONNX export layout (`model.onnx` + `tokenizer.json`).
//! Inference runs on dedicated threads behind a bounded queue, batching whatever requests are
//! waiting; long texts are cut into overlapping token windows so nothing goes unscanned.

use std::{
    borrow::Cow,
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use ort::{
    environment::Environment,
    session::{Session, builder::GraphOptimizationLevel},
    value::Tensor,
};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};
use tokio::sync::{mpsc, oneshot};

/// Tokens per window and overlap between windows.
const WINDOW: usize = 256;
const STRIDE: usize = 32;
const MAX_BATCH: usize = 32;
const QUEUE: usize = 512;

/// Where models and the ONNX Runtime library are found.
#[derive(Clone, Debug, Default)]
pub struct ModelSettings {
    /// The default models (`<dir>/minilm/`), built by `make models`.
    pub models_dir: Option<PathBuf>,
    /// `libonnxruntime.so`; else the `ORT_DYLIB_PATH` environment variable.
    pub onnxruntime: Option<PathBuf>,
    /// Inference threads per model.
    pub threads: usize,
    /// The key model directories must be signed with, unless a policy names its own.
    pub public_key: Option<ModelKey>,
}

/// An ed25519 public key that signs model manifests.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModelKey([u8; 32]);

impl ModelKey {
    /// A PEM `PUBLIC KEY` (as `openssl pkey -pubout` writes it), or the 32 raw bytes in base64.
    pub fn parse(text: &str) -> Result<Self, String> {
        bulwark_api::policy::model_key(text).map(Self).map_err(|e| format!("the model public key is {e}"))
    }

    /// `parse`, of a file's contents when `arg` names a file.
    pub fn from_arg(arg: &str) -> Result<Self, String> {
        match std::fs::read_to_string(arg) {
            Ok(text) => Self::parse(&text).map_err(|e| format!("{arg}: {e}")),
            Err(_) => Self::parse(arg),
        }
    }
}

/// The files a model is loaded from, read once: what is verified is what is loaded, however the
/// directory changes meanwhile.
struct Files {
    onnx: Vec<u8>,
    tokenizer: Vec<u8>,
    config: Option<Vec<u8>>,
}

impl Files {
    /// Reads the files; `signed`, only regular files (a link or a device is refused unread).
    fn read(dir: &Path, signed: bool) -> Result<Self, String> {
        let read = |name: &str| {
            let path = dir.join(name);
            let meta = std::fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            if signed && !meta.is_file() {
                return Err(format!(
                    "{}: {name} is not a regular file; a signed model holds only files",
                    dir.display()
                ));
            }
            std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))
        };
        let config = dir.join("config.json").exists().then(|| read("config.json")).transpose()?;
        Ok(Self { onnx: read("model.onnx")?, tokenizer: read("tokenizer.json")?, config })
    }

    /// The bytes of `name` as read, else as they are now (a file the loader does not use).
    fn bytes(&self, dir: &Path, name: &str) -> Result<Cow<'_, [u8]>, String> {
        match (name, &self.config) {
            ("model.onnx", _) => Ok(Cow::Borrowed(&self.onnx)),
            ("tokenizer.json", _) => Ok(Cow::Borrowed(&self.tokenizer)),
            ("config.json", Some(config)) => Ok(Cow::Borrowed(config)),
            _ => {
                std::fs::read(dir.join(name)).map(Cow::Owned).map_err(|e| format!("{}: {e}", dir.join(name).display()))
            }
        }
    }
}

/// Checks a signed model directory: `manifest.sig` (base64) is the ed25519 signature of the
/// bytes of `manifest.json` by `key`, and the manifest's `sha256` lists every file of the
/// directory (weights, tokenizer, config) with its hash; a file it does not list, or one
/// whose hash differs, refuses the model.
fn verify_signed(dir: &Path, files: &Files, key: &ModelKey) -> Result<(), String> {
    use base64::Engine as _;
    let at = |f: &str| dir.join(f);
    let manifest = std::fs::read(at("manifest.json"))
        .map_err(|e| format!("{}: {e}; a signed model needs a manifest", at("manifest.json").display()))?;
    let sig = std::fs::read_to_string(at("manifest.sig"))
        .map_err(|e| format!("{}: {e}; the model is not signed", at("manifest.sig").display()))?;
    let sig = base64::engine::general_purpose::STANDARD
        .decode(sig.trim())
        .map_err(|e| format!("{}: not base64: {e}", at("manifest.sig").display()))?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &key.0)
        .verify(&manifest, &sig)
        .map_err(|_| format!("{}: the signature does not verify against the model public key", dir.display()))?;
    let listed = serde_json::from_slice::<serde_json::Value>(&manifest)
        .ok()
        .and_then(|m| m.get("sha256")?.as_object().cloned())
        .ok_or_else(|| format!("{}: the manifest has no sha256 map", at("manifest.json").display()))?;
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut present = vec![];
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // A link could point the loader at a file no one signed.
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            return Err(format!("{}: {name} is not a regular file; a signed model holds only files", dir.display()));
        }
        if name == "manifest.json" || name == "manifest.sig" {
            continue;
        }
        if !listed.contains_key(&name) {
            return Err(format!("{}: {name} is not in the signed manifest", dir.display()));
        }
        present.push(name);
    }
    for (name, want) in &listed {
        if !present.contains(name) {
            return Err(format!("{}: {name}, which the signed manifest lists, is missing", dir.display()));
        }
        let got = sha256(&files.bytes(dir, name)?);
        if Some(got.as_str()) != want.as_str() {
            return Err(format!("{}: sha256 {got} is not the signed {}", at(name).display(), want));
        }
    }
    // Listed, as well as read: a file gone between the two would be loaded unlisted.
    for required in ["model.onnx", "tokenizer.json"] {
        if !listed.contains_key(required) {
            return Err(format!("{}: the signed manifest does not list {required}", dir.display()));
        }
    }
    Ok(())
}

static ENV: OnceLock<Result<Environment, String>> = OnceLock::new();
static ENV_INIT: Mutex<()> = Mutex::new(());

fn environment(settings: &ModelSettings) -> Result<&'static Environment, String> {
    if let Some(e) = ENV.get() {
        return e.as_ref().map_err(Clone::clone);
    }
    let _guard = ENV_INIT.lock();
    let result = ENV.get_or_init(|| {
        let path = settings
            .onnxruntime
            .clone()
            .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
            .ok_or("ONNX Runtime not found: set ORT_DYLIB_PATH to libonnxruntime.so (1.31 or newer)")?;
        let builder =
            ort::init_from(&path).map_err(|e| format!("loading ONNX Runtime from {}: {e}", path.display()))?;
        builder.with_name("bulwark").with_telemetry(false).build().map_err(|e| format!("starting ONNX Runtime: {e}"))
    });
    result.as_ref().map_err(Clone::clone)
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a model directory before it is loaded: its signature and every file's hash when a
/// key applies, and `model.onnx` against a pinned hash (the policy's, else the manifest's).
fn verify(dir: &Path, files: &Files, pinned: Option<&str>, key: Option<&ModelKey>) -> Result<(), String> {
    if let Some(key) = key {
        verify_signed(dir, files, key)?;
    }
    let model = dir.join("model.onnx");
    let expected = match pinned {
        Some(h) => Some(h.to_ascii_lowercase()),
        None => std::fs::read_to_string(dir.join("manifest.json"))
            .ok()
            .and_then(|m| serde_json::from_str::<serde_json::Value>(&m).ok())
            .and_then(|m| m.pointer("/sha256/model.onnx")?.as_str().map(str::to_owned)),
    };
    if let Some(expected) = expected {
        let got = sha256(&files.onnx);
        if got != expected {
            return Err(format!("{}: sha256 {got} does not match the pinned {expected}", model.display()));
        }
    }
    Ok(())
}

/// What a model's output means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Token states (mean-pooled) or a sentence embedding.
    Embedding,
    /// Class logits; the probability of this class index is the score.
    Class(usize),
}

struct Job {
    text: String,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
}

/// A loaded model and its inference threads.
pub struct Model {
    tx: mpsc::Sender<Job>,
    pub output: Output,
}

impl Model {
    pub fn load(
        dir: &Path,
        pinned: Option<&str>,
        key: Option<&ModelKey>,
        output: Option<Output>,
        settings: &ModelSettings,
    ) -> Result<Arc<Self>, String> {
        let env = environment(settings)?;
        let files = Files::read(dir, key.is_some())?;
        verify(dir, &files, pinned, key)?;
        let mut tokenizer = Tokenizer::from_bytes(&files.tokenizer)
            .map_err(|e| format!("{}: {e}", dir.join("tokenizer.json").display()))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: WINDOW,
                stride: STRIDE,
                strategy: TruncationStrategy::LongestFirst,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| format!("tokenizer: {e}"))?;
        tokenizer.with_padding(None);
        let output = match output {
            Some(o) => o,
            None => classifier_output(files.config.as_deref()),
        };
        let threads = settings.threads.max(1);
        let (tx, rx) = mpsc::channel::<Job>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let session = open(env, &dir.join("model.onnx"), &files.onnx)?;
            let (rx, tokenizer) = (rx.clone(), tokenizer.clone());
            std::thread::Builder::new()
                .name(format!("bulwark-model-{i}"))
                .spawn(move || worker(session, tokenizer, output, rx))
                .map_err(|e| format!("starting an inference thread: {e}"))?;
        }
        Ok(Arc::new(Self { tx, output }))
    }

    /// One vector per window of `text`: embeddings, or `[score]` for a classifier.
    pub async fn infer(&self, text: String) -> Result<Vec<Vec<f32>>, String> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Job { text, reply }).await.map_err(|_| "the inference threads stopped".to_owned())?;
        rx.await.map_err(|_| "the inference thread dropped the request".to_owned())?
    }
}

/// A session on the verified bytes of the model (so a model is one file, without external data).
fn open(env: &Environment, path: &Path, onnx: &[u8]) -> Result<Session, String> {
    fn build(env: &Environment, onnx: &[u8]) -> ort::Result<Session> {
        Session::builder(env)?
            .with_optimization_level(GraphOptimizationLevel::Level3)?
            .with_intra_threads(1)?
            .commit_from_memory(onnx)
    }
    build(env, onnx).map_err(|e| format!("{}: {e}", path.display()))
}

/// The class index meaning "injection" (or "unsafe", "positive") from `config.json`'s
/// `id2label`, else 1.
fn classifier_output(config: Option<&[u8]>) -> Output {
    let labels = config
        .and_then(|c| serde_json::from_slice::<serde_json::Value>(c).ok())
        .and_then(|c| c.get("id2label").cloned());
    let positive = labels
        .as_ref()
        .and_then(|l| l.as_object())
        .and_then(|m| {
            m.iter().find_map(|(k, v)| {
                let v = v.as_str()?.to_ascii_lowercase();
                (v.contains("injection") || v.contains("jailbreak") || v.contains("unsafe") || v == "label_1")
                    .then(|| k.parse().ok())?
            })
        })
        .unwrap_or(1);
    Output::Class(positive)
}

fn worker(mut session: Session, tokenizer: Tokenizer, output: Output, rx: Arc<Mutex<mpsc::Receiver<Job>>>) {
    let has_types = session.inputs().iter().any(|i| i.name() == "token_type_ids");
    loop {
        let mut jobs = Vec::with_capacity(MAX_BATCH);
        {
            let mut rx = rx.lock();
            match rx.blocking_recv() {
                Some(j) => jobs.push(j),
                None => return,
            }
            // Dynamic batching: take whatever else is already waiting.
            while jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
        }
        let result = run_batch(&mut session, &tokenizer, output, has_types, &jobs);
        match result {
            Ok(per_job) => {
                for (job, out) in jobs.into_iter().zip(per_job) {
                    let _ = job.reply.send(Ok(out));
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// One tokenized window: the job it belongs to, ids, attention mask, type ids.
type Window = (usize, Vec<u32>, Vec<u32>, Vec<u32>);
type Loaded = HashMap<(PathBuf, Option<String>, Option<ModelKey>), Result<Arc<Model>, String>>;

fn run_batch(
    session: &mut Session,
    tokenizer: &Tokenizer,
    output: Output,
    has_types: bool,
    jobs: &[Job],
) -> Result<Vec<Vec<Vec<f32>>>, String> {
    // Every window of every text, remembering which job it belongs to.
    let mut windows: Vec<Window> = vec![];
    for (j, job) in jobs.iter().enumerate() {
        let enc = tokenizer.encode(job.text.as_str(), true).map_err(|e| format!("tokenizing: {e}"))?;
        let mut all = vec![enc.clone()];
        all.extend(enc.get_overflowing().iter().cloned());
        for e in all {
            windows.push((j, e.get_ids().to_vec(), e.get_attention_mask().to_vec(), e.get_type_ids().to_vec()));
        }
    }
    let mut per_job: Vec<Vec<Vec<f32>>> = vec![vec![]; jobs.len()];
    for chunk in windows.chunks(MAX_BATCH) {
        let seq = chunk.iter().map(|w| w.1.len()).max().unwrap_or(1).max(1);
        let b = chunk.len();
        let (mut ids, mut mask, mut types) = (vec![0i64; b * seq], vec![0i64; b * seq], vec![0i64; b * seq]);
        for (r, (_, i, m, t)) in chunk.iter().enumerate() {
            for c in 0..i.len() {
                ids[r * seq + c] = i64::from(i[c]);
                mask[r * seq + c] = i64::from(m[c]);
                types[r * seq + c] = i64::from(t[c]);
            }
        }
        let tensor = |v: Vec<i64>| Tensor::from_array(([b, seq], v)).map_err(|e| e.to_string());
        let mut inputs = ort::inputs!["input_ids" => tensor(ids)?, "attention_mask" => tensor(mask.clone())?];
        if has_types {
            inputs.push(("token_type_ids".into(), tensor(types)?.into()));
        }
        let outputs = session.run(inputs).map_err(|e| format!("inference: {e}"))?;
        let (shape, data) = outputs[0].try_extract_tensor::<f32>().map_err(|e| format!("model output: {e}"))?;
        let dims: Vec<usize> = shape.iter().map(|d| *d as usize).collect();
        for (r, (job, ..)) in chunk.iter().enumerate() {
            let v = match (output, dims.as_slice()) {
                (Output::Embedding, [_, s, h]) => {
                    mean_pool(&data[r * s * h..(r + 1) * s * h], &mask[r * seq..(r + 1) * seq], *h)
                }
                (Output::Embedding, [_, h]) => normalize(data[r * h..(r + 1) * h].to_vec()),
                (Output::Class(k), [_, n]) => {
                    let logits = &data[r * n..(r + 1) * n];
                    vec![softmax_at(logits, k.min(n - 1))]
                }
                _ => return Err(format!("unexpected model output shape {dims:?}")),
            };
            per_job[*job].push(v);
        }
    }
    Ok(per_job)
}

fn mean_pool(states: &[f32], mask: &[i64], hidden: usize) -> Vec<f32> {
    let mut v = vec![0f32; hidden];
    let mut n = 0f32;
    for (t, m) in mask.iter().enumerate() {
        if *m == 0 || (t + 1) * hidden > states.len() {
            continue;
        }
        n += 1.0;
        for (acc, x) in v.iter_mut().zip(&states[t * hidden..(t + 1) * hidden]) {
            *acc += x;
        }
    }
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
    normalize(v)
}

pub fn normalize(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

fn softmax_at(logits: &[f32], k: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    (logits[k] - max).exp() / sum
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Loaded models by directory, shared by every policy and kept across config reloads.
#[derive(Default)]
pub struct ModelHub {
    pub settings: ModelSettings,
    loaded: Mutex<Loaded>,
}

impl ModelHub {
    pub fn new(settings: ModelSettings) -> Self {
        Self { settings, loaded: Mutex::new(HashMap::new()) }
    }

    /// The default encoder built by `make models`.
    pub fn default_encoder_dir(&self) -> Option<PathBuf> {
        self.settings.models_dir.as_ref().map(|d| d.join("minilm"))
    }

    /// A model, verified with the settings' key (if any) before it is loaded.
    pub fn get(&self, dir: &Path, pinned: Option<&str>, output: Option<Output>) -> Result<Arc<Model>, String> {
        self.get_signed(dir, pinned, self.settings.public_key.as_ref(), output)
    }

    /// A model, verified with `key` (if any) before it is loaded.
    pub fn get_signed(
        &self,
        dir: &Path,
        pinned: Option<&str>,
        signer: Option<&ModelKey>,
        output: Option<Output>,
    ) -> Result<Arc<Model>, String> {
        let key = (dir.to_path_buf(), pinned.map(str::to_owned), signer.cloned());
        let mut loaded = self.loaded.lock();
        if let Some(Ok(m)) = loaded.get(&key) {
            return Ok(m.clone());
        }
        let result = if dir.join("model.onnx").exists() {
            Model::load(dir, pinned, signer, output, &self.settings)
        } else {
            Err(format!(
                "no model at {} (run `make models`, or point the policy's model.path at an ONNX export)",
                dir.display()
            ))
        };
        loaded.insert(key, result.clone());
        result
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use ring::signature::{Ed25519KeyPair, KeyPair as _};

    use super::*;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn signed_model_directories_are_checked_file_by_file() {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let raw = pair.public_key().as_ref().to_vec();
        let spki = [&[0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00][..], &raw].concat();
        let pem = format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", b64(&spki));
        let key = ModelKey::parse(&pem).unwrap();
        assert_eq!(ModelKey::parse(&b64(&raw)).unwrap(), key, "PEM and raw base64 name the same key");
        assert!(ModelKey::parse("bm90IGEga2V5").is_err());

        let dir = std::env::temp_dir().join(format!("bulwark-model-sig-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.onnx"), b"weights").unwrap();
        std::fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
        let sign = |files: &[&str]| {
            let sha: serde_json::Map<String, serde_json::Value> =
                files.iter().map(|f| ((*f).to_owned(), sha256(&std::fs::read(dir.join(f)).unwrap()).into())).collect();
            let manifest = serde_json::to_vec(&serde_json::json!({"sha256": sha})).unwrap();
            std::fs::write(dir.join("manifest.json"), &manifest).unwrap();
            std::fs::write(dir.join("manifest.sig"), b64(pair.sign(&manifest).as_ref())).unwrap();
        };
        let check = |pinned: Option<&str>, key: Option<&ModelKey>| {
            Files::read(&dir, key.is_some()).and_then(|files| verify(&dir, &files, pinned, key))
        };
        sign(&["model.onnx", "tokenizer.json"]);
        assert_eq!(check(None, Some(&key)), Ok(()));

        std::fs::write(dir.join("config.json"), b"{}").unwrap();
        assert!(check(None, Some(&key)).unwrap_err().ends_with("config.json is not in the signed manifest"));
        std::os::unix::fs::symlink("/etc/hostname", dir.join("vocab.txt")).unwrap();
        assert!(check(None, Some(&key)).unwrap_err().contains("vocab.txt is not a regular file"));
        std::fs::remove_file(dir.join("vocab.txt")).unwrap();
        // A link to an endless device is refused before it is read.
        std::fs::rename(dir.join("model.onnx"), dir.join("weights")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.join("model.onnx")).unwrap();
        assert!(check(None, Some(&key)).unwrap_err().contains("model.onnx is not a regular file"));
        std::fs::remove_file(dir.join("model.onnx")).unwrap();
        std::fs::rename(dir.join("weights"), dir.join("model.onnx")).unwrap();
        sign(&["model.onnx", "tokenizer.json", "config.json"]);
        assert_eq!(check(None, Some(&key)), Ok(()), "listed and signed, it belongs");
        // What is checked is what was read, and so what is loaded: a later swap changes neither.
        let files = Files::read(&dir, true).unwrap();
        std::fs::write(dir.join("model.onnx"), b"other weights").unwrap();
        assert_eq!(verify(&dir, &files, None, Some(&key)), Ok(()));
        assert_eq!(files.onnx, b"weights");
        std::fs::write(dir.join("model.onnx"), b"weights").unwrap();

        std::fs::write(dir.join("config.json"), b"{\"id2label\": {}}").unwrap();
        assert!(check(None, Some(&key)).unwrap_err().contains("config.json: sha256"));
        sign(&["model.onnx", "tokenizer.json", "config.json"]);
        let mut manifest = std::fs::read(dir.join("manifest.json")).unwrap();
        manifest.push(b' ');
        std::fs::write(dir.join("manifest.json"), manifest).unwrap();
        assert!(check(None, Some(&key)).unwrap_err().ends_with("does not verify against the model public key"));

        sign(&["model.onnx", "config.json"]);
        std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
        assert!(check(None, Some(&key)).unwrap_err().contains("tokenizer.json: No such file"));
        std::fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
        assert!(check(None, Some(&key)).unwrap_err().ends_with("tokenizer.json is not in the signed manifest"));
        std::fs::remove_file(dir.join("manifest.sig")).unwrap();
        assert!(check(None, Some(&key)).unwrap_err().ends_with("the model is not signed"));
        // Without a key, the single-file pin still holds.
        assert!(check(Some(&"0".repeat(64)), None).unwrap_err().contains("does not match the pinned"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
