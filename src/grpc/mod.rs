//! gRPC transport: `tally.v1.CreditService` and `tally.v1.AdminService` handlers.
//!
//! Each handler decodes (convert.rs), calls the service, and encodes; errors become statuses
//! in status.rs. Nothing here decides a business rule.

mod admin;
pub mod convert;
pub mod status;

pub use admin::AdminApi;

use std::sync::Arc;

use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::catalog::Catalog;
use crate::domain::Caller;
use crate::pb;
use crate::service::Ledger;
use convert::hold_to_pb;

/// Largest request message a service accepts: 16 KiB (the largest valid request, a Reserve
/// with 16 metadata pairs at their limits, is about 5.5 KiB).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;
/// Response header set on a replayed idempotent response.
pub const REPLAY_HEADER: &str = "tally-idempotent-replay";

/// The caller of a request: set by an authentication layer as a request extension;
/// without one, every request is the anonymous caller.
fn caller<T>(req: &Request<T>) -> Caller {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_else(Caller::anonymous)
}

fn respond<T>(replayed: bool, message: T) -> Response<T> {
    let mut r = Response::new(message);
    if replayed {
        r.metadata_mut()
            .insert(REPLAY_HEADER, MetadataValue::from_static("true"));
    }
    r
}

/// The CreditService implementation.
#[derive(Clone, Debug)]
pub struct CreditApi {
    ledger: Ledger,
    catalog: Arc<Catalog>,
}

impl CreditApi {
    /// Handlers over `ledger`, pricing operations from `catalog`.
    pub fn new(ledger: Ledger, catalog: Arc<Catalog>) -> Self {
        Self { ledger, catalog }
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl pb::credit_service_server::CreditService for CreditApi {
    #[instrument(name = "tally.v1.CreditService/CheckBalance", skip_all, fields(account_id = %req.get_ref().account_id))]
    async fn check_balance(
        &self,
        req: Request<pb::CheckBalanceRequest>,
    ) -> Reply<pb::CheckBalanceResponse> {
        let account = convert::account(&req.get_ref().account_id)?;
        let b = self.ledger.check_balance(&account).await?;
        let (by_source, next_expiry) = convert::breakdown_to_pb(&b);
        Ok(Response::new(pb::CheckBalanceResponse {
            by_source,
            next_expiry,
            allowance_left: b.allowance_left,
            entitlements: self
                .catalog
                .plans
                .get(&b.plan)
                .map(|p| p.entitlements.clone().into_iter().collect())
                .unwrap_or_default(),
            low_balance: convert::is_low(&self.catalog, &b.plan, b.available),
            plan: b.plan,
            account_id: b.account_id,
            available: b.available,
            held: b.held,
            open_holds: b.open_holds,
        }))
    }

    #[instrument(name = "tally.v1.CreditService/Reserve", skip_all, fields(account_id = %req.get_ref().account_id, amount = req.get_ref().amount))]
    async fn reserve(&self, req: Request<pb::ReserveRequest>) -> Reply<pb::ReserveResponse> {
        let caller = caller(&req);
        let (key, cmd) = convert::reserve(req.into_inner(), &self.ledger.limits(), &self.catalog)?;
        let a = self.ledger.reserve(&caller, key, &cmd).await?;
        Ok(respond(
            a.replayed,
            pb::ReserveResponse {
                hold: Some(hold_to_pb(a.outcome.hold)),
                available: a.outcome.available,
            },
        ))
    }

    #[instrument(name = "tally.v1.CreditService/Commit", skip_all, fields(hold_id = %req.get_ref().hold_id, amount = req.get_ref().amount))]
    async fn commit(&self, req: Request<pb::CommitRequest>) -> Reply<pb::CommitResponse> {
        let caller = caller(&req);
        let (key, cmd) = convert::commit(req.get_ref())?;
        let a = self.ledger.commit_hold(&caller, key, &cmd).await?;
        let o = a.outcome;
        Ok(respond(
            a.replayed,
            pb::CommitResponse {
                hold: Some(hold_to_pb(o.hold)),
                released: o.released,
                extra_drawn: o.extra_drawn,
                available: o.available,
            },
        ))
    }

    #[instrument(name = "tally.v1.CreditService/Refund", skip_all, fields(hold_id = %req.get_ref().hold_id))]
    async fn refund(&self, req: Request<pb::RefundRequest>) -> Reply<pb::RefundResponse> {
        let caller = caller(&req);
        let (key, cmd) = convert::refund(req.get_ref())?;
        let a = self.ledger.refund(&caller, key, &cmd).await?;
        let o = a.outcome;
        Ok(respond(
            a.replayed,
            pb::RefundResponse {
                hold: Some(hold_to_pb(o.hold)),
                refunded: o.refunded,
                available: o.available,
            },
        ))
    }

    #[instrument(name = "tally.v1.CreditService/ExtendHold", skip_all, fields(hold_id = %req.get_ref().hold_id))]
    async fn extend_hold(
        &self,
        req: Request<pb::ExtendHoldRequest>,
    ) -> Reply<pb::ExtendHoldResponse> {
        let caller = caller(&req);
        let (key, cmd) = convert::extend(req.get_ref(), &self.ledger.limits())?;
        let a = self.ledger.extend_hold(&caller, key, &cmd).await?;
        Ok(respond(
            a.replayed,
            pb::ExtendHoldResponse {
                hold: Some(hold_to_pb(a.outcome.hold)),
            },
        ))
    }

    #[instrument(name = "tally.v1.CreditService/GetHold", skip_all, fields(hold_id = %req.get_ref().hold_id))]
    async fn get_hold(&self, req: Request<pb::GetHoldRequest>) -> Reply<pb::GetHoldResponse> {
        let id = convert::hold_id(&req.get_ref().hold_id)?;
        let hold = self.ledger.hold(&id).await?;
        Ok(Response::new(pb::GetHoldResponse {
            hold: Some(hold_to_pb(hold)),
        }))
    }

    #[instrument(name = "tally.v1.CreditService/ListHolds", skip_all, fields(account_id = %req.get_ref().account_id))]
    async fn list_holds(&self, req: Request<pb::ListHoldsRequest>) -> Reply<pb::ListHoldsResponse> {
        let query = convert::list_holds(req.get_ref())?;
        let holds = self.ledger.list_holds(&query).await?;
        let full = u32::try_from(holds.len()).is_ok_and(|n| n == query.limit);
        let next_page_token = match holds.last() {
            Some(last) if full => {
                convert::page_token(&convert::holds_binding(&query), &last.hold_id)
            }
            _ => String::new(),
        };
        Ok(Response::new(pb::ListHoldsResponse {
            holds: holds.into_iter().map(hold_to_pb).collect(),
            next_page_token,
        }))
    }

    #[instrument(name = "tally.v1.CreditService/EstimateCost", skip_all, fields(operation = %req.get_ref().operation))]
    async fn estimate_cost(
        &self,
        req: Request<pb::EstimateCostRequest>,
    ) -> Reply<pb::EstimateCostResponse> {
        let r = req.get_ref();
        let estimate = convert::price(&self.catalog, &r.operation, &r.params)
            .map_err(crate::service::ServiceError::from)?;
        Ok(Response::new(convert::estimate_to_pb(estimate)))
    }
}
