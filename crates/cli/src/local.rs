//! Running the product's pieces on this machine (demo, benchmarks): a working directory and
//! waiting for a service to be ready.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;

/// A working directory: the one given (kept), or a fresh temporary one removed when dropped.
pub struct WorkDir {
    path: PathBuf,
    temporary: bool,
}

impl WorkDir {
    pub fn new(given: Option<&Path>, prefix: &str) -> Result<Self> {
        let (path, temporary) = match given {
            Some(d) => (d.to_path_buf(), false),
            None => (
                std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple())),
                true,
            ),
        };
        std::fs::create_dir_all(&path)?;
        Ok(WorkDir { path, temporary })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.temporary {
            std::fs::remove_dir_all(&self.path).ok();
        }
    }
}

/// Polls `{url}/readyz` every `every` until it answers 200 (true) or `limit` has passed (false).
pub async fn wait_ready(url: &str, every: Duration, limit: Duration) -> bool {
    let client = reqwest::Client::new();
    let started = Instant::now();
    while started.elapsed() < limit {
        if client
            .get(format!("{url}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return true;
        }
        tokio::time::sleep(every).await;
    }
    false
}

/// The end-of-text token of a tokenizer, under the names phi, GPT-2 and ChatML vocabularies use.
pub fn eos_token(tokenizer: &tokenizers::Tokenizer) -> Option<u32> {
    hybrid_model::checkpoint::eos_in_vocabulary(tokenizer)
}

/// `question` as a user message rendered with the model's chat template.
pub fn chat_prompt(
    template: Option<&str>,
    tokenizer: &tokenizers::Tokenizer,
    eos: Option<u32>,
    question: &str,
) -> Result<String> {
    let template = template.ok_or_else(|| anyhow::anyhow!("the model has no chat template"))?;
    let eos = eos
        .and_then(|id| tokenizer.id_to_token(id))
        .unwrap_or_default();
    let template = hybrid_model::chat::ChatTemplate::new(template, "", &eos)?;
    Ok(template.render(&[hybrid_model::chat::Message::user(question)], true)?)
}

/// A free port on loopback (bound, then released for a child process to take).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A child process killed when dropped.
pub struct Service(pub std::process::Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A binary installed beside this one (`hybrid-gateway`, `hybrid-worker`).
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if !path.exists() {
        anyhow::bail!(
            "{} not found: build the services first (`cargo build --release`)",
            path.display()
        );
    }
    Ok(path)
}
