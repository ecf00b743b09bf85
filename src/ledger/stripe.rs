//! Stripe effects, applied exactly once: one transaction per verified event, under one lock
//! that exists whether or not any fact does yet ([`Tx::lock_stripe`]), so every order and
//! every concurrency of deliveries ends in the same books. The domain decides
//! ([`crate::domain::payment`]); this module loads the facts, books the decision and stores
//! the facts back.

use chrono::{DateTime, Utc};

use super::engine::{Load, fill_book, open_book};
use crate::domain::payment::{Moved, PackGrant, StripeEffect, StripeEvent, StripeRecord};
use crate::domain::plan::Policy;
use crate::domain::{AccountId, LedgerError};
use crate::storage::{RandomIds, StorageError, StorageResult, Tx};

/// The account of a customer: the stored link, else the account the event names (then linked).
async fn account_for(
    tx: &mut dyn Tx,
    customer: &str,
    hint: Option<&str>,
    now: DateTime<Utc>,
) -> StorageResult<Option<String>> {
    if let Some(a) = tx.account_of_customer(customer).await? {
        return Ok(Some(a));
    }
    let Some(account) = hint else { return Ok(None) };
    open_if_new(tx, account, now).await?;
    tx.link(account, customer, now).await?;
    Ok(Some(account.to_owned()))
}

/// Creates the account if it does not exist (then writes its `account.opened`).
async fn open_if_new(tx: &mut dyn Tx, account: &str, now: DateTime<Utc>) -> StorageResult<()> {
    if let Some((book, true)) = tx
        .lock_book(account, Some(crate::domain::DEFAULT_PLAN), now)
        .await?
    {
        tx.write(&book, now).await?;
    }
    Ok(())
}

/// Why the books move: the entries' reason, and the business fact (named in the events).
#[derive(Clone, Copy)]
struct Why<'a> {
    reason: &'a str,
    fact: Option<&'a str>,
}

/// A grant the books make for a business fact.
struct FactGrant<'a> {
    business_key: &'a str,
    amount: i64,
    source: crate::domain::book::Source,
    expires_at: Option<DateTime<Utc>>,
}

/// Books what a Stripe fact decided on one account, in the caller's transaction: the grant
/// (named by its business key, so the database refuses a second one), then `claw` credits
/// taken back (positive; debt for what the grants cannot cover) or given back (negative).
/// Returns the new grant's id.
async fn book_fact(
    tx: &mut dyn Tx,
    account: &str,
    grant: Option<FactGrant<'_>>,
    claw: i64,
    why: Why<'_>,
    policy: &Policy,
    now: DateTime<Utc>,
) -> StorageResult<Option<String>> {
    let load = Load {
        create: grant.as_ref().map(|_| crate::domain::DEFAULT_PLAN),
        ..Load::default()
    };
    let mut book = open_book(tx, account, load, policy, now)
        .await?
        .ok_or(LedgerError::AccountNotFound)?;
    let booked = match &grant {
        Some(g) => Some((
            g.source,
            crate::domain::Credits::new("credits", g.amount)
                .map_err(|v| StorageError::Other(v.to_string()))?,
            g.expires_at,
        )),
        None => None,
    };
    let granted = book.book_decision(booked, claw, why.reason, now, &mut RandomIds)?;
    book.fact = why.fact.map(str::to_owned);
    tx.write(&book, now).await?;
    if let (Some(id), Some(g)) = (&granted, &grant) {
        tx.tag_grant(id, g.business_key).await?;
    }
    Ok(granted)
}

/// Loads everything known about the payment a fact concerns: its purchase (by business key,
/// else by PaymentIntent), the PaymentIntent's charges and their disputes, and the charge and
/// dispute the fact names. Called under [`Tx::lock_stripe`].
async fn load_payment(
    tx: &mut dyn Tx,
    business_key: Option<&str>,
    fact: &crate::domain::payment::Fact,
) -> StorageResult<crate::domain::payment::Payment> {
    use crate::domain::payment::Payment;
    let (pi, charge, dispute) = fact.names();
    let mut pi = pi.map(str::to_owned);
    let purchase = match business_key {
        Some(key) => tx.purchase(Some(key), None).await?,
        None => None,
    };
    if pi.is_none() {
        pi = purchase.as_ref().and_then(|p| p.payment_intent.clone());
    }
    // A dispute named by its charge only: the charge's refund events may know its PaymentIntent.
    if pi.is_none()
        && let Some(ch) = charge
    {
        pi = tx
            .charges(None, Some(ch))
            .await?
            .into_iter()
            .find_map(|c| c.payment_intent);
    }
    let purchase = match (purchase, pi.as_deref()) {
        (Some(p), _) => Some(p),
        (None, Some(pi)) => tx.purchase(None, Some(pi)).await?,
        (None, None) => None,
    };
    let charges = if pi.is_some() || charge.is_some() {
        tx.charges(pi.as_deref(), charge).await?
    } else {
        Vec::new()
    };
    let disputes = if pi.is_some() || charge.is_some() {
        tx.disputes(pi.as_deref(), charge, dispute).await?
    } else {
        Vec::new()
    };
    Ok(Payment {
        purchase,
        charges,
        disputes,
    })
}

/// Folds the pre-0009 claw-back facts of the fact's charge and dispute into the payment
/// ([`crate::domain::payment::Payment::fold_legacy`]), then forgets them: what they took is
/// not taken again, and a dispute won later gives it back.
async fn fold_legacy(
    tx: &mut dyn Tx,
    payment: &mut crate::domain::payment::Payment,
    fact: &crate::domain::payment::Fact,
) -> StorageResult<()> {
    let (_, charge, dispute) = fact.names();
    let Some(charge) = charge else {
        return Ok(());
    };
    let refund_key = format!("refund:{charge}");
    let refunded = tx
        .legacy_claw(&refund_key)
        .await?
        .map(|(_, credits)| credits);
    let dispute_key = dispute.map(|d| format!("dispute:{d}"));
    let disputed = match (&dispute_key, dispute) {
        (Some(key), Some(d)) => tx
            .legacy_claw(key)
            .await?
            .map(|(state, credits)| (d, credits, state == "restored")),
        _ => None,
    };
    if (refunded.is_some() || disputed.is_some()) && payment.fold_legacy(charge, refunded, disputed)
    {
        if refunded.is_some() {
            tx.forget_legacy(&refund_key).await?;
        }
        if let (Some(key), Some(_)) = (&dispute_key, disputed) {
            tx.forget_legacy(key).await?;
        }
    }
    Ok(())
}

/// Applies a fact about a payment: the domain decides, the books move, the facts are stored.
async fn apply_payment_fact(
    tx: &mut dyn Tx,
    business_key: Option<&str>,
    fact: &crate::domain::payment::Fact,
    grant: Option<&PackGrant>,
    reason: &str,
    policy: &Policy,
    now: DateTime<Utc>,
) -> StorageResult<Moved> {
    let mut payment = load_payment(tx, business_key, fact).await?;
    let before = payment.clone();
    fold_legacy(tx, &mut payment, fact).await?;
    let decision = payment.apply(business_key, fact.clone());
    let mut moved = Moved::default();
    let account = payment.purchase.as_ref().and_then(|p| p.account_id.clone());
    if decision.moves()
        && let Some(account) = account
    {
        let key = payment
            .purchase
            .as_ref()
            .map(|p| p.business_key.clone())
            .unwrap_or_default();
        let fact_grant = decision.grant.as_ref().map(|(_, amount)| FactGrant {
            business_key: &key,
            amount: *amount,
            source: grant.map_or(crate::domain::book::Source::Purchase, |g| g.source),
            expires_at: grant
                .and_then(|g| g.expires_in)
                .and_then(|t| now.checked_add_signed(t)),
        });
        let id = book_fact(
            tx,
            &account,
            fact_grant,
            decision.claw,
            Why {
                reason,
                fact: Some(&key).filter(|k| !k.is_empty()).map(String::as_str),
            },
            policy,
            now,
        )
        .await?;
        if let Some(p) = payment.purchase.as_mut()
            && id.is_some()
        {
            p.grant_id = id;
        }
        moved.granted = decision.grant.map_or(0, |(_, n)| n);
        moved.clawed = decision.claw.max(0);
        moved.given_back = decision.claw.min(0).saturating_neg();
    }
    if let Some(p) = &payment.purchase
        && before.purchase.as_ref() != Some(p)
    {
        tx.put_purchase(p, now).await?;
        let was = before.purchase.as_ref().map(|b| b.state);
        if was != Some(p.state)
            && let Some(e) = crate::domain::event::purchase(p, now, &mut RandomIds)
        {
            tx.emit(&[e]).await?;
        }
    }
    for c in &payment.charges {
        if !before.charges.contains(c) {
            tx.put_charge(c).await?;
        }
    }
    for d in &payment.disputes {
        if !before.disputes.contains(d) {
            tx.put_dispute(d).await?;
        }
    }
    Ok(moved)
}

/// Stores a subscription state if it is at least as new as the stored one, then puts the
/// account on the plan of its newest live subscription.
async fn apply_subscription(
    tx: &mut dyn Tx,
    incoming: Option<crate::domain::payment::Subscription>,
    failed: Option<(&str, i64)>,
    policy: &Policy,
    now: DateTime<Utc>,
) -> StorageResult<()> {
    use crate::domain::payment::Subscription;
    let account = match (incoming, failed) {
        (Some(incoming), _) => {
            let mut stored = tx.subscription(&incoming.subscription_id).await?;
            let seen = stored.as_ref().map(|s| {
                (
                    s.status.clone(),
                    s.plan.clone(),
                    s.period_end,
                    s.cancel_at_period_end,
                )
            });
            if !Subscription::accept(&mut stored, incoming) {
                return Ok(());
            }
            let Some(s) = stored else { return Ok(()) };
            tx.put_subscription(&s).await?;
            // Only what a product shows changed: status, plan, period end, cancellation.
            let now_seen = (
                s.status.clone(),
                s.plan.clone(),
                s.period_end,
                s.cancel_at_period_end,
            );
            if seen.as_ref() != Some(&now_seen) {
                tx.emit(&[crate::domain::event::subscription(&s, now, &mut RandomIds)])
                    .await?;
            }
            s.account_id
        }
        (None, Some((id, as_of))) => {
            let Some(mut s) = tx.subscription(id).await? else {
                return Ok(());
            };
            if !s.payment_failed(as_of) {
                return Ok(());
            }
            tx.put_subscription(&s).await?;
            tx.emit(&[crate::domain::event::subscription(&s, now, &mut RandomIds)])
                .await?;
            s.account_id
        }
        (None, None) => return Ok(()),
    };
    let subs = tx.subscriptions_of(&account).await?;
    let plan = Subscription::plan_of(&subs, crate::domain::DEFAULT_PLAN);
    let (mut book, _) = tx
        .lock_book(&account, None, now)
        .await?
        .ok_or(LedgerError::AccountNotFound)?;
    if book.plan != plan {
        // As SetPlan's `Target::PlanSwitch`: the current periods' grants too, so the switch
        // gives at most one allowance per period key.
        let load = Load {
            periods: true,
            ..Load::default()
        };
        fill_book(tx, &mut book, load, policy, now).await?;
        book.switch_plan(&plan, policy.for_plan(&plan), now, &mut RandomIds)?;
        tx.write(&book, now).await?;
    }
    Ok(())
}

/// Records a Stripe event and applies its effect (see [`super::Engine::record_stripe_event`]).
pub(super) async fn record(
    mut tx: Box<dyn Tx>,
    event: &StripeEvent,
    effect: &StripeEffect,
    policy: &Policy,
) -> StorageResult<StripeRecord> {
    let now = tx.now().await?;
    tx.lock_stripe().await?;
    if !tx.insert_stripe_event(event, now).await? {
        return Ok(StripeRecord::DuplicateEvent);
    }
    let mut moved = Moved::default();
    match effect {
        StripeEffect::None => {}
        StripeEffect::Payment {
            business_key,
            fact,
            grant,
            reason,
        } => {
            moved = apply_payment_fact(
                tx.as_mut(),
                business_key.as_deref(),
                fact,
                grant.as_ref(),
                reason,
                policy,
                now,
            )
            .await?;
        }
        StripeEffect::Link {
            account_id,
            customer,
        } => {
            open_if_new(tx.as_mut(), account_id.as_str(), now).await?;
            tx.link(account_id.as_str(), customer, now).await?;
        }
        StripeEffect::Subscription(state) => {
            if let Some(account) = account_for(
                tx.as_mut(),
                &state.customer,
                state.account_hint.as_deref(),
                now,
            )
            .await?
            {
                let incoming = state.to_subscription(account);
                apply_subscription(tx.as_mut(), Some(incoming), None, policy, now).await?;
            }
        }
        StripeEffect::PaymentFailed {
            subscription,
            as_of,
        } => {
            apply_subscription(tx.as_mut(), None, Some((subscription, *as_of)), policy, now)
                .await?;
        }
        StripeEffect::InvoiceGrant {
            business_key,
            customer,
            account_hint,
            amount,
            expires_at,
            reason,
        } => {
            let hint = account_hint.as_ref().map(AccountId::as_str);
            if tx.fact_state(business_key).await?.as_deref() != Some("granted")
                && let Some(account) = account_for(tx.as_mut(), customer, hint, now).await?
            {
                let grant = FactGrant {
                    business_key,
                    amount: amount.get(),
                    source: crate::domain::book::Source::Subscription,
                    expires_at: *expires_at,
                };
                let why = Why {
                    reason,
                    fact: Some(business_key),
                };
                let id = book_fact(tx.as_mut(), &account, Some(grant), 0, why, policy, now).await?;
                tx.put_fact(
                    business_key,
                    Some(&account),
                    "granted",
                    amount.get(),
                    id.as_deref(),
                    now,
                )
                .await?;
                moved.granted = amount.get();
            }
        }
    }
    tx.commit().await?;
    Ok(StripeRecord::Recorded(moved))
}
