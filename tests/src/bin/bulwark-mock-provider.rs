//! A local mock LLM provider for the quickstart and end-to-end tests (OpenAI and Anthropic
//! APIs, streaming, scripted faults through the `x-mock` header). Prints its URL.

use std::{net::SocketAddr, time::Duration};

use bulwark_tests::mock::MockProvider;
use clap::Parser;

#[derive(Parser)]
#[command(name = "bulwark-mock-provider", about = "Mock OpenAI/Anthropic provider for local testing")]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18080")]
    listen: SocketAddr,
    /// Content chunks per streamed response.
    #[arg(long, default_value_t = 8)]
    chunks: usize,
    /// Milliseconds between streamed chunks.
    #[arg(long, default_value_t = 20)]
    chunk_delay_ms: u64,
    /// Name used in response ids.
    #[arg(long, default_value = "mock")]
    name: String,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let mock =
        MockProvider::start_with(&cli.name, cli.chunks, Duration::from_millis(cli.chunk_delay_ms), cli.listen).await;
    println!("mock provider listening on {}", mock.url());
    let _ = tokio::signal::ctrl_c().await;
}
