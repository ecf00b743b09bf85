//! Commands that need no server: `catalog`, `config`, `auth`, and `stripe` (which talks to
//! Stripe and the database directly).
#![allow(clippy::print_stdout)] // printing results is this module's job

use super::{AuthCommand, CatalogCommand, Cli, ConfigCommand, StripeCommand};
use crate::catalog::Catalog;

/// Runs `tally catalog ...`.
///
/// # Errors
/// The validation error of the file.
pub fn run_catalog(action: &CatalogCommand) -> Result<(), String> {
    match action {
        CatalogCommand::PrintDefault => {
            print!("{}", crate::catalog::DEFAULT_TOML);
            Ok(())
        }
        CatalogCommand::Check { path } => {
            let c = Catalog::load(path).map_err(|e| e.to_string())?;
            println!(
                "ok: {} plans ({}), {} packs, {} priced operations ({})",
                c.plans.len(),
                c.plans.keys().cloned().collect::<Vec<_>>().join(", "),
                c.packs.len(),
                c.pricing.len(),
                c.pricing.keys().cloned().collect::<Vec<_>>().join(", ")
            );
            Ok(())
        }
    }
}

/// Runs `tally config ...`.
pub fn run_config(action: &ConfigCommand) {
    match action {
        ConfigCommand::PrintDefault => {
            print!(
                "{}",
                crate::config::print_default(&<Cli as clap::CommandFactory>::command())
            );
        }
    }
}

/// Runs `tally auth ...`.
///
/// # Errors
/// Standard input cannot be read or is empty.
pub fn run_auth(action: &AuthCommand) -> Result<(), String> {
    match action {
        AuthCommand::NewToken => {
            let token = crate::auth::new_token();
            println!("token        {token}");
            println!("token_sha256 {}", crate::auth::hash_token(&token));
        }
        AuthCommand::HashToken => {
            let mut token = String::new();
            std::io::stdin()
                .read_line(&mut token)
                .map_err(|e| format!("standard input: {e}"))?;
            if token.trim().is_empty() {
                return Err("give the token on standard input".into());
            }
            println!("{}", crate::auth::hash_token(&token));
        }
    }
    Ok(())
}

/// Runs `tally stripe sync ACCOUNT`.
///
/// # Errors
/// A message for people.
pub async fn run_stripe(action: StripeCommand) -> Result<(), String> {
    let StripeCommand::Sync { account, serve } = action;
    let settings = serve.settings()?;
    let api = settings
        .stripe
        .clone()
        .ok_or("no Stripe API key: set TALLY_STRIPE_API_KEY or --stripe-api-key")?;
    let account_id =
        crate::domain::AccountId::parse("account", &account).map_err(|e| e.to_string())?;
    let engine = crate::app::open_store(
        &settings.database_url,
        2,
        std::sync::Arc::new(settings.catalog.policy()),
    )
    .await
    .map_err(|e| e.to_string())?;
    let state = crate::http::HttpState {
        ledger: crate::ledger::Ledger::new(engine, settings.limits),
        catalog: settings.catalog.clone(),
        webhook_secrets: std::sync::Arc::new(Vec::new()),
        livemode: settings.stripe_livemode,
        stripe: Some(api.clone()),
        auth: std::sync::Arc::clone(&settings.auth),
        readiness: crate::health::Readiness::default(),
        balances: None,
        heartbeat: crate::app::WATCH_HEARTBEAT_DEFAULT,
        admin: None,
    };
    let v = crate::http::billing::resync_subscription(&state, &api, &account_id).await?;
    println!("{v:#}");
    Ok(())
}
