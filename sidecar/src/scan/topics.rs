//! `banTopics`: the cosine similarity of a text's windows to the policy's topics, in the
//! space of the sentence encoder. The topics are embedded once, on first use.

use std::sync::Arc;

use tokio::sync::OnceCell;

use super::model::{Model, dot};

pub struct Topics {
    encoder: Arc<Model>,
    topics: Vec<String>,
    embedded: OnceCell<Vec<Vec<f32>>>,
}

impl Topics {
    pub fn new(encoder: Arc<Model>, topics: Vec<String>) -> Self {
        Self { encoder, topics, embedded: OnceCell::new() }
    }

    pub async fn score(&self, text: &str) -> Result<f32, String> {
        let topics = self
            .embedded
            .get_or_try_init(|| async {
                let mut out = vec![];
                for t in &self.topics {
                    out.extend(self.encoder.infer(t.clone()).await?);
                }
                Ok::<_, String>(out)
            })
            .await?;
        let windows = self.encoder.infer(text.to_owned()).await?;
        Ok(windows.iter().flat_map(|w| topics.iter().map(move |t| dot(w, t))).fold(0.0, f32::max))
    }
}
