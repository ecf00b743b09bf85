//! A fake video-export job using `tally::client`: estimate, reserve, keep the hold alive while
//! "rendering", then commit what it really cost — or, if the render fails, let the guard give
//! the credits back.
//!
//! ```sh
//! tally serve &                                   # in another terminal
//! tally account grant user_1 500 --reason demo
//! cargo run --example video_job -- user_1 12      # account, seconds of video
//! ```
//! `TALLY_SERVER` and `TALLY_TOKEN` are honoured.
#![allow(clippy::print_stdout)]

use std::time::Duration;

use tally::client::{Client, Config, Error};
use tally::pb;
use tally::pb::reserve_request::Cost;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let account = args.next().unwrap_or_else(|| "user_1".into());
    let seconds: u32 = args.next().and_then(|s| s.parse().ok()).unwrap_or(12);
    let server = std::env::var("TALLY_SERVER").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let token = std::env::var("TALLY_TOKEN").ok();

    let channel = tonic::transport::Endpoint::from_shared(server)?
        .connect()
        .await?;
    let config = Config {
        hold_ttl: Duration::from_secs(30), // heartbeats every 10 s keep a long render alive
        ..Config::default()
    };
    let client = Client::new(channel, token.as_deref(), config)?;

    // The server prices the job from its table: no price is hard-coded here.
    let request = pb::ReserveRequest {
        account_id: account.clone(),
        cost: Some(Cost::Operation(pb::PricedOperation {
            name: "video_export".into(),
            params: [
                ("seconds".to_owned(), seconds.to_string()),
                ("resolution".to_owned(), "1080p".to_owned()),
            ]
            .into(),
        })),
        ..Default::default()
    };
    let job = match client.reserve_job(request).await {
        Ok(job) => job,
        Err(Error::InsufficientCredits {
            available,
            requested,
        }) => {
            println!("not enough credits: {available} available, {requested} needed; top up first");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    println!("reserved {} credits ({})", job.hold().amount, job.hold_id());

    // "Render": one frame batch per second of video, 10 ms each here.
    for _ in 0..seconds {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if seconds > 600 {
        // A failed render: the guard refunds the hold (explicitly here; dropping it does too).
        job.fail("render failed").await?;
        println!("render failed; credits returned");
        return Ok(());
    }
    // The real cost: what was rendered (here a little less than estimated).
    let actual = (job.hold().amount * 9 / 10).max(1);
    let settled = job.commit(actual).await?;
    println!(
        "committed {actual}, released {}; available now {}",
        settled.released, settled.available
    );
    Ok(())
}
