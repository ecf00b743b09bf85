//! gRPC transport: `tally.v1.CreditService` and `tally.v1.AdminService` handlers.
//!
//! Each handler decodes (convert.rs), calls the service, and encodes; errors become statuses
//! in status.rs. Nothing here decides a business rule.

mod admin;
pub mod codec;
pub mod convert;
pub mod gate;
pub mod limit;
pub mod status;

pub use admin::AdminApi;

use std::sync::Arc;

use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::auth::{Denied, Principal};
use crate::catalog::Catalog;
use crate::domain::{Caller, LedgerError};
use crate::ledger::Ledger;
use crate::ledger::watch::Watcher;
use crate::pb;
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

/// The authenticated caller the gate attached; a request without one is refused (fail closed).
fn principal<T>(req: &Request<T>) -> Result<Arc<Principal>, Status> {
    req.extensions()
        .get::<Arc<Principal>>()
        .cloned()
        .ok_or_else(|| gate::denied_status(&Denied::Unauthenticated))
}

/// The caller, if it may touch `account` (checked before the request is validated, so a
/// tenant learns nothing about other tenants' ids).
fn allow_account<T>(req: &Request<T>, account: &str) -> Result<Arc<Principal>, Status> {
    let p = principal(req)?;
    if p.may_access(account) {
        Ok(p)
    } else {
        Err(gate::denied_status(&Denied::Account))
    }
}

/// The caller, if it may touch every account (cross-account listings and exports).
fn allow_all_accounts<T>(req: &Request<T>) -> Result<Arc<Principal>, Status> {
    let p = principal(req)?;
    if p.unrestricted() {
        Ok(p)
    } else {
        Err(gate::denied_status(&Denied::Account))
    }
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
    watcher: Watcher,
}

impl CreditApi {
    /// Handlers over `ledger`, pricing operations from `catalog`, live balances from `watcher`.
    pub fn new(ledger: Ledger, catalog: Arc<Catalog>, watcher: Watcher) -> Self {
        Self {
            ledger,
            catalog,
            watcher,
        }
    }
}

/// The messages of a WatchBalance stream.
pub type BalanceStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::WatchBalanceResponse, Status>> + Send>,
>;

type Reply<T> = Result<Response<T>, Status>;

impl CreditApi {
    /// A caller limited to account prefixes may only operate on holds of those accounts. The
    /// hold's account never changes, so checking before the operation is not a race. An unknown
    /// hold passes, and the operation itself answers HOLD_NOT_FOUND.
    async fn allow_hold<T>(&self, req: &Request<T>, hold_id: &str) -> Result<(), Status> {
        let p = principal(req)?;
        if p.unrestricted() {
            return Ok(());
        }
        let id = convert::hold_id(hold_id)?;
        match self.ledger.hold(&id).await {
            Ok(h) if p.may_access(&h.account_id) => Ok(()),
            Ok(_) => Err(gate::denied_status(&Denied::Account)),
            Err(crate::ledger::ServiceError::Rejected(LedgerError::HoldNotFound)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[tonic::async_trait]
impl pb::credit_service_server::CreditService for CreditApi {
    #[instrument(name = "tally.v1.CreditService/CheckBalance", skip_all, fields(account_id = %req.get_ref().account_id))]
    async fn check_balance(
        &self,
        req: Request<pb::CheckBalanceRequest>,
    ) -> Reply<pb::CheckBalanceResponse> {
        allow_account(&req, &req.get_ref().account_id)?;
        let account = convert::account(&req.get_ref().account_id)?;
        let b = self.ledger.check_balance(&account).await?;
        Ok(Response::new(convert::balance_to_pb(&self.catalog, &b)))
    }

    #[instrument(name = "tally.v1.CreditService/Reserve", skip_all, fields(account_id = %req.get_ref().account_id, amount = convert::amount_asked(req.get_ref())))]
    async fn reserve(&self, req: Request<pb::ReserveRequest>) -> Reply<pb::ReserveResponse> {
        allow_account(&req, &req.get_ref().account_id)?;
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
        self.allow_hold(&req, &req.get_ref().hold_id).await?;
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
        self.allow_hold(&req, &req.get_ref().hold_id).await?;
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
        self.allow_hold(&req, &req.get_ref().hold_id).await?;
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
        self.allow_hold(&req, &req.get_ref().hold_id).await?;
        let id = convert::hold_id(&req.get_ref().hold_id)?;
        let hold = self.ledger.hold(&id).await?;
        Ok(Response::new(pb::GetHoldResponse {
            hold: Some(hold_to_pb(hold)),
        }))
    }

    #[instrument(name = "tally.v1.CreditService/ListHolds", skip_all, fields(account_id = %req.get_ref().account_id))]
    async fn list_holds(&self, req: Request<pb::ListHoldsRequest>) -> Reply<pb::ListHoldsResponse> {
        allow_account(&req, &req.get_ref().account_id)?;
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
        principal(&req)?;
        let r = req.get_ref();
        let estimate = convert::price(&self.catalog, &r.operation, &r.params)
            .map_err(crate::ledger::ServiceError::from)?;
        Ok(Response::new(convert::estimate_to_pb(estimate)))
    }

    type WatchBalanceStream = BalanceStream;

    #[instrument(name = "tally.v1.CreditService/WatchBalance", skip_all, fields(account_id = %req.get_ref().account_id))]
    async fn watch_balance(
        &self,
        req: Request<pb::WatchBalanceRequest>,
    ) -> Reply<Self::WatchBalanceStream> {
        let p = allow_account(&req, &req.get_ref().account_id)?;
        let (account, after) = convert::watch_balance(req.get_ref())?;
        let watch = self
            .watcher
            .watch(p.caller.as_str(), &account, after)
            .await?;
        let catalog = Arc::clone(&self.catalog);
        let stream = futures_util::stream::unfold(watch, move |mut w| {
            let catalog = Arc::clone(&catalog);
            async move {
                let item =
                    w.next()
                        .await?
                        .map_err(Status::from)
                        .map(|s| pb::WatchBalanceResponse {
                            version: s.balance.version,
                            balance: Some(convert::balance_to_pb(&catalog, &s.balance)),
                        });
                Some((item, w))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    #[instrument(name = "tally.v1.CreditService/ListOperations", skip_all)]
    async fn list_operations(
        &self,
        req: Request<pb::ListOperationsRequest>,
    ) -> Reply<pb::ListOperationsResponse> {
        principal(&req)?;
        Ok(Response::new(convert::operations_to_pb(&self.catalog)))
    }
}
