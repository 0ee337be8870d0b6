//! A local mock LLM provider for the quickstart and end-to-end tests (OpenAI and Anthropic
//! APIs, streaming, scripted faults through the `x-mock` header). Prints its URL.

use std::{net::SocketAddr, time::Duration};

use bulwark_tests::mock::{Behavior, MockProvider};
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
    /// After this many seconds, answer every call with this fault (`--fail-with`): a model that
    /// goes bad while it serves.
    #[arg(long, value_name = "SECS")]
    fail_after: Option<u64>,
    /// The fault, as the `x-mock` header spells it: `status:500`, `delay:3000`, `break:2`, ...
    #[arg(long, default_value = "status:500", value_parser = fault)]
    fail_with: Behavior,
}

fn fault(s: &str) -> Result<Behavior, String> {
    Behavior::parse(s).ok_or_else(|| format!("{s:?} is not a fault like status:500, delay:3000 or break:2"))
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let mock =
        MockProvider::start_with(&cli.name, cli.chunks, Duration::from_millis(cli.chunk_delay_ms), cli.listen).await;
    println!("mock provider listening on {}", mock.url());
    if let Some(secs) = cli.fail_after {
        let mock = mock.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            println!("mock provider {}: failing every call from now on ({:?})", cli.name, cli.fail_with);
            mock.set_default(cli.fail_with);
        });
    }
    let _ = tokio::signal::ctrl_c().await;
}
