//! Outbound calls to Stripe through async-stripe (pinned `=1.0.0-rc.10`), with a configurable
//! base URL (a loopback fake in tests) and a timeout on every call.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde_json::{Value, json};
use stripe::StripeRequest as _;
use stripe_billing::billing_portal_session::CreateBillingPortalSession;
use stripe_checkout::CheckoutSessionMode;
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionLineItems, RetrieveCheckoutSession,
};
use stripe_core::customer::CreateCustomer;

/// Stripe's API base.
pub const DEFAULT_BASE_URL: &str = "https://api.stripe.com/";
/// Default deadline of one Stripe call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a Stripe call failed, as the sidecar reports it (never with the API key).
#[derive(Debug, thiserror::Error)]
pub enum StripeCallError {
    /// Stripe answered 4xx: the request (or its ids) is wrong.
    #[error("Stripe refused the request ({status}): {message}")]
    Refused {
        /// Stripe's HTTP status.
        status: u16,
        /// Stripe's message.
        message: String,
    },
    /// Stripe failed, timed out or could not be reached.
    #[error("Stripe is unavailable: {0}")]
    Unavailable(String),
}

fn key(k: &str) -> stripe::RequestStrategy {
    // Keys are at most 255 bytes: a longer one (an unusually long account id) is hashed.
    let k = if k.len() > 255 {
        use sha2::Digest as _;
        format!(
            "tally-sha256-{}",
            hex::encode(sha2::Sha256::digest(k.as_bytes()))
        )
    } else {
        k.to_owned()
    };
    stripe::IdempotencyKey::new(k).map_or(
        stripe::RequestStrategy::Once,
        stripe::RequestStrategy::Idempotent,
    )
}

impl From<stripe::StripeError> for StripeCallError {
    fn from(e: stripe::StripeError) -> Self {
        match e {
            stripe::StripeError::Stripe(err, status) if (400..500).contains(&status) => {
                Self::Refused {
                    status,
                    message: err.message.clone().unwrap_or_else(|| "no message".into()),
                }
            }
            stripe::StripeError::Stripe(_, status) => Self::Unavailable(format!("status {status}")),
            stripe::StripeError::Timeout => Self::Unavailable("timed out".into()),
            stripe::StripeError::JSONDeserialize(m) => {
                Self::Unavailable(format!("unreadable response: {m}"))
            }
            stripe::StripeError::ClientError(m) | stripe::StripeError::ConfigError(m) => {
                Self::Unavailable(m)
            }
        }
    }
}

/// A Checkout Session to create.
#[derive(Clone, Debug)]
pub struct NewCheckout {
    /// The Stripe customer (created for the account beforehand).
    pub customer: String,
    /// The Tally account (client_reference_id and metadata.account_id).
    pub account_id: String,
    /// `payment` for a pack, `subscription` for a plan.
    pub subscription: bool,
    /// The Stripe Price.
    pub price: String,
    /// metadata.pack_id or metadata.plan_id.
    pub item: (&'static str, String),
    /// Where Stripe sends the buyer after paying.
    pub success_url: String,
    /// Where Stripe sends the buyer after cancelling.
    pub cancel_url: String,
    /// The caller's `Idempotency-Key` (a retry of the same request gets the same session), or
    /// a fresh one.
    pub idempotency_key: String,
}

/// The Stripe client.
#[derive(Clone)]
pub struct StripeApi {
    client: stripe::Client,
}

impl fmt::Debug for StripeApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StripeApi(***)")
    }
}

impl StripeApi {
    /// A client for `base_url` with `secret_key`.
    ///
    /// # Errors
    /// `Unavailable` when the client cannot be configured.
    pub fn new(
        secret_key: &str,
        base_url: &str,
        timeout: Duration,
    ) -> Result<Self, StripeCallError> {
        let client = stripe::ClientBuilder::new(secret_key)
            .url(base_url)
            .timeout(timeout)
            .build()
            .map_err(|_| {
                StripeCallError::Unavailable("the Stripe client could not be configured".into())
            })?;
        Ok(Self { client })
    }

    /// Creates a customer for `account_id` (its id in metadata), with an idempotency key
    /// derived from the account: within Stripe's 24 h key window, every replica and retry
    /// creating the account's customer gets the same one.
    ///
    /// # Errors
    /// [`StripeCallError`].
    pub async fn create_customer(&self, account_id: &str) -> Result<String, StripeCallError> {
        let metadata: HashMap<String, String> =
            [("account_id".to_owned(), account_id.to_owned())].into();
        let c = CreateCustomer::new()
            .metadata(metadata)
            .customize()
            .request_strategy(key(&format!("tally-customer-{account_id}")))
            .send(&self.client)
            .await?;
        Ok(c.id.as_str().to_owned())
    }

    /// Creates a Checkout Session; returns its id and URL.
    ///
    /// # Errors
    /// [`StripeCallError`].
    pub async fn create_checkout(
        &self,
        n: &NewCheckout,
    ) -> Result<(String, String), StripeCallError> {
        let idempotency = format!("tally-checkout-{}-{}", n.account_id, n.idempotency_key);
        let metadata: HashMap<String, String> = [
            ("account_id".to_owned(), n.account_id.clone()),
            (n.item.0.to_owned(), n.item.1.clone()),
        ]
        .into();
        let mut item = CreateCheckoutSessionLineItems::new();
        item.price = Some(n.price.clone());
        item.quantity = Some(1);
        let mut req = CreateCheckoutSession::new()
            .mode(if n.subscription {
                CheckoutSessionMode::Subscription
            } else {
                CheckoutSessionMode::Payment
            })
            .customer(n.customer.clone())
            .client_reference_id(n.account_id.clone())
            .line_items(vec![item])
            .metadata(metadata.clone())
            .success_url(n.success_url.clone())
            .cancel_url(n.cancel_url.clone());
        if n.subscription {
            let mut data =
                stripe_checkout::checkout_session::CreateCheckoutSessionSubscriptionData::new();
            data.metadata = Some(metadata);
            req = req.subscription_data(data);
        }
        let s = req
            .customize()
            .request_strategy(key(&idempotency))
            .send(&self.client)
            .await?;
        Ok((s.id.as_str().to_owned(), s.url.unwrap_or_default()))
    }

    /// Creates a customer-portal session; returns its URL.
    ///
    /// # Errors
    /// [`StripeCallError`].
    pub async fn portal(
        &self,
        customer: &str,
        return_url: &str,
    ) -> Result<String, StripeCallError> {
        let s = CreateBillingPortalSession::new()
            .customer(customer)
            .return_url(return_url)
            .customize()
            .request_strategy(key(&format!(
                "tally-portal-{}",
                uuid::Uuid::new_v4().simple()
            )))
            .send(&self.client)
            .await?;
        Ok(s.url)
    }

    /// The customer's newest subscription (any status) as the JSON object a subscription event
    /// would carry, or `None` if the customer has none.
    ///
    /// # Errors
    /// [`StripeCallError`].
    pub async fn latest_subscription(
        &self,
        customer: &str,
    ) -> Result<Option<Value>, StripeCallError> {
        let list = stripe_billing::subscription::ListSubscription::new()
            .customer(customer)
            .status(stripe_billing::subscription::ListSubscriptionStatus::All)
            .limit(1)
            .send(&self.client)
            .await?;
        Ok(list.data.into_iter().next().map(|s| {
            let item = s.items.data.first();
            json!({
                "id": s.id.as_str(),
                "customer": s.customer.id().as_str(),
                "status": s.status.as_str(),
                "cancel_at_period_end": s.cancel_at_period_end,
                "created": s.created,
                "metadata": s.metadata,
                "items": {"data": item.map(|i| vec![json!({
                    "price": {"id": i.price.id.as_str()},
                    "current_period_end": i.current_period_end,
                })]).unwrap_or_default()},
            })
        }))
    }

    /// The PaymentIntent of a charge (disputes rendered by older API versions name only their
    /// charge).
    ///
    /// # Errors
    /// [`StripeCallError`].
    pub async fn charge_payment_intent(
        &self,
        charge: &str,
    ) -> Result<Option<String>, StripeCallError> {
        let c = stripe_core::charge::RetrieveCharge::new(charge)
            .send(&self.client)
            .await?;
        Ok(c.payment_intent.map(|p| p.id().as_str().to_owned()))
    }

    /// Reads a Checkout Session back as the JSON object a webhook would carry (the fields
    /// Tally reads), with its livemode.
    ///
    /// # Errors
    /// [`StripeCallError`].
    pub async fn checkout_session(&self, id: &str) -> Result<(Value, bool), StripeCallError> {
        let s = RetrieveCheckoutSession::new(id).send(&self.client).await?;
        let object = json!({
            "id": s.id.as_str(),
            "mode": s.mode.as_str(),
            "payment_status": s.payment_status.as_str(),
            "client_reference_id": s.client_reference_id,
            "metadata": s.metadata.unwrap_or_default(),
            "customer": s.customer.as_ref().map(|c| c.id().as_str().to_owned()),
            "subscription": s.subscription.as_ref().map(|c| c.id().as_str().to_owned()),
            "payment_intent": s.payment_intent.as_ref().map(|c| c.id().as_str().to_owned()),
            "amount_total": s.amount_total,
        });
        Ok((object, s.livemode))
    }
}
