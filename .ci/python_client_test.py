"""An independent gRPC client of Tally, run by .ci/python-client-test inside its venv.

Only grpcio and stubs generated from proto/ (no Tally code): health, reflection v1 and v1alpha,
bearer-token authentication, and the Grant → Reserve → Commit → Refund → CheckBalance flow with
an idempotent replay and an INSUFFICIENT_CREDITS error decoded from grpc-status-details-bin.
Environment: TALLY_ADDR (host:port of the gRPC listener), TALLY_TEST_TOKEN (a caller's token with
the generation and admin roles). Prints one line per check, then
`python-client: N passed, M failed`; exits 1 if any check failed.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status

from tally.v1 import credit_service_pb2 as pb
from tally.v1 import credit_service_pb2_grpc as pb_grpc

ADDR = os.environ["TALLY_ADDR"]
TOKEN = os.environ["TALLY_TEST_TOKEN"]
AUTH = (("authorization", f"Bearer {TOKEN}"),)
TIMEOUT = 5.0  # seconds: a deadline on every call
ACCOUNT = "py_user"
EXPECTED_SERVICES = {"tally.v1.CreditService", "tally.v1.AdminService", "grpc.health.v1.Health"}
# grpcio-reflection ships only v1alpha; v1 has the same messages (only the package differs), so
# both versions are called with the v1alpha message classes on their own method paths.
REFLECTION_METHODS = {
    "v1": "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "v1alpha": "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
}

passed: list[str] = []
failed: list[str] = []


class CheckFailed(AssertionError):
    pass


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


def expect_eq(actual, wanted, what: str) -> None:
    if actual != wanted:
        raise CheckFailed(f"{what}: got {actual!r}, want {wanted!r}")


def check(name: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except CheckFailed as e:
        failed.append(name)
        print(f"FAIL {name}: {e}", flush=True)
    except grpc.RpcError as e:
        failed.append(name)
        print(f"FAIL {name}: unexpected RPC error {e.code()} {e.details()!r}", flush=True)
    except Exception:  # noqa: BLE001 - a broken check is a failed check
        failed.append(name)
        print(f"FAIL {name}:\n{traceback.format_exc()}", flush=True)
    else:
        passed.append(name)
        print(f"ok   {name}", flush=True)


def expect_rpc_error(fn: Callable[[], object], code: grpc.StatusCode, what: str) -> grpc.RpcError:
    try:
        fn()
    except grpc.RpcError as e:
        expect_eq(e.code(), code, f"{what}: status code (details {e.details()!r})")
        return e
    raise CheckFailed(f"{what}: succeeded, want {code}")


def all_metadata(call) -> dict[str, str]:
    md: dict[str, str] = {}
    for k, v in list(call.initial_metadata() or ()) + list(call.trailing_metadata() or ()):
        md.setdefault(k, v if isinstance(v, str) else v.decode("latin-1"))
    return md


channel = grpc.insecure_channel(ADDR)
grpc.channel_ready_future(channel).result(timeout=10)
health = health_pb2_grpc.HealthStub(channel)
credit = pb_grpc.CreditServiceStub(channel)
admin = pb_grpc.AdminServiceStub(channel)


def reflect(version: str, requests, metadata=AUTH):
    call = channel.stream_stream(
        REFLECTION_METHODS[version],
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return list(call(iter(requests), metadata=metadata, timeout=TIMEOUT))


# ---- health (open: no token) ------------------------------------------------------------------

def check_health_serving() -> None:
    for service in ("", "liveness", "readiness"):
        r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        expect_eq(r.status, health_pb2.HealthCheckResponse.SERVING, f"Check({service!r})")


def check_health_unknown() -> None:
    expect_rpc_error(
        lambda: health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT),
        grpc.StatusCode.NOT_FOUND,
        "Check('no.such.Service')",
    )


# ---- reflection (needs a valid token) ---------------------------------------------------------

def check_reflection(version: str) -> Callable[[], None]:
    def run() -> None:
        # list_services, then the file that defines CreditService, in one stream.
        responses = reflect(version, [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="tally.v1.CreditService"),
        ])
        expect_eq(len(responses), 2, f"{version}: responses")
        listed = {s.name for s in responses[0].list_services_response.service}
        missing = EXPECTED_SERVICES - listed
        expect(not missing, f"{version}: list_services lacks {sorted(missing)} (got {sorted(listed)})")
        fdr = responses[1]
        expect(fdr.HasField("file_descriptor_response"),
               f"{version}: file_containing_symbol answered {fdr.WhichOneof('message_response')}")
        services = set()
        for raw in fdr.file_descriptor_response.file_descriptor_proto:
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            if fd.package == "tally.v1":
                services |= {s.name for s in fd.service}
        expect({"CreditService", "AdminService"} <= services,
               f"{version}: tally.v1 descriptor has services {sorted(services)}")
    return run


def check_reflection_needs_token() -> None:
    for version in REFLECTION_METHODS:
        expect_rpc_error(
            lambda: reflect(version, [reflection_pb2.ServerReflectionRequest(list_services="")], metadata=()),
            grpc.StatusCode.UNAUTHENTICATED,
            f"{version} reflection without a token",
        )


def check_credit_needs_token() -> None:
    req = pb.CheckBalanceRequest(account_id=ACCOUNT)
    expect_rpc_error(lambda: credit.CheckBalance(req, timeout=TIMEOUT),
                     grpc.StatusCode.UNAUTHENTICATED, "CheckBalance without a token")
    expect_rpc_error(
        lambda: credit.CheckBalance(req, metadata=(("authorization", "Bearer tly_not_a_known_token"),),
                                    timeout=TIMEOUT),
        grpc.StatusCode.UNAUTHENTICATED, "CheckBalance with an unknown token")


# ---- the job flow -----------------------------------------------------------------------------

state: dict[str, object] = {}
RESERVE = pb.ReserveRequest(account_id=ACCOUNT, amount=30, idempotency_key="py-reserve-1",
                            ttl=Duration(seconds=600), metadata={"job": "py-job-1"})


def check_grant() -> None:
    r = admin.Grant(pb.GrantRequest(account_id=ACCOUNT, amount=100, reason="python client test",
                                    idempotency_key="py-grant-1", source=pb.GRANT_SOURCE_PURCHASE),
                    metadata=AUTH, timeout=TIMEOUT)
    expect_eq(r.account_id, ACCOUNT, "Grant account_id")
    expect_eq(r.available, 100, "Grant available")
    expect(r.grant_id.startswith("grt_"), f"Grant grant_id {r.grant_id!r}")


def check_reserve() -> None:
    r, call = credit.Reserve.with_call(RESERVE, metadata=AUTH, timeout=TIMEOUT)
    expect_eq(r.hold.state, pb.HOLD_STATE_OPEN, "Reserve hold state")
    expect_eq(r.hold.amount, 30, "Reserve hold amount")
    expect_eq(r.hold.account_id, ACCOUNT, "Reserve hold account_id")
    expect_eq(dict(r.hold.metadata), {"job": "py-job-1"}, "Reserve hold metadata")
    expect(r.hold.hold_id.startswith("hold_") and len(r.hold.hold_id) == 37, f"hold_id {r.hold.hold_id!r}")
    expect_eq(r.available, 70, "Reserve available")
    replay = all_metadata(call).get("tally-idempotent-replay")
    expect(replay in (None, "false"), f"first Reserve carries tally-idempotent-replay: {replay!r}")
    state["hold_id"] = r.hold.hold_id
    state["reserve_bytes"] = r.SerializeToString()


def check_reserve_replay() -> None:
    r, call = credit.Reserve.with_call(RESERVE, metadata=AUTH, timeout=TIMEOUT)
    expect_eq(r.hold.hold_id, state["hold_id"], "replayed hold_id")
    expect_eq(r.SerializeToString(), state["reserve_bytes"], "replayed response bytes")
    expect_eq(all_metadata(call).get("tally-idempotent-replay"), "true", "tally-idempotent-replay")


def check_commit() -> None:
    r = credit.Commit(pb.CommitRequest(hold_id=state["hold_id"], amount=20, idempotency_key="py-commit-1"),
                      metadata=AUTH, timeout=TIMEOUT)
    expect_eq(r.hold.state, pb.HOLD_STATE_COMMITTED, "Commit hold state")
    expect_eq(r.hold.committed_amount, 20, "Commit committed_amount")
    expect_eq(r.released, 10, "Commit released")
    expect_eq(r.extra_drawn, 0, "Commit extra_drawn")
    expect_eq(r.available, 80, "Commit available")


def check_refund() -> None:
    r = credit.Refund(pb.RefundRequest(hold_id=state["hold_id"], amount=5, reason="partial failure",
                                       idempotency_key="py-refund-1"),
                      metadata=AUTH, timeout=TIMEOUT)
    expect_eq(r.hold.state, pb.HOLD_STATE_COMMITTED, "Refund hold state")
    expect_eq(r.hold.refunded_amount, 5, "Refund refunded_amount")
    expect_eq(r.refunded, 5, "Refund refunded")
    expect_eq(r.available, 85, "Refund available")


def check_balance() -> None:
    r = credit.CheckBalance(pb.CheckBalanceRequest(account_id=ACCOUNT), metadata=AUTH, timeout=TIMEOUT)
    expect_eq((r.available, r.held, r.open_holds), (85, 0, 0), "CheckBalance (available, held, open_holds)")
    h = credit.GetHold(pb.GetHoldRequest(hold_id=state["hold_id"]), metadata=AUTH, timeout=TIMEOUT).hold
    expect_eq((h.state, h.amount, h.committed_amount, h.refunded_amount),
              (pb.HOLD_STATE_COMMITTED, 30, 20, 5), "GetHold (state, amount, committed, refunded)")
    expect(h.HasField("resolved_at"), "GetHold resolved_at unset on a committed hold")


def check_insufficient_credits() -> None:
    err = expect_rpc_error(
        lambda: credit.Reserve(pb.ReserveRequest(account_id=ACCOUNT, amount=1000, idempotency_key="py-reserve-big"),
                               metadata=AUTH, timeout=TIMEOUT),
        grpc.StatusCode.FAILED_PRECONDITION, "Reserve 1000")
    status = rpc_status.from_call(err)
    expect(status is not None, "no grpc-status-details-bin on the error")
    infos = []
    for any_ in status.details:
        if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_.Unpack(info)
            infos.append(info)
    expect_eq(len(infos), 1, f"ErrorInfo count in details {[d.type_url for d in status.details]}")
    expect_eq(infos[0].reason, "INSUFFICIENT_CREDITS", "ErrorInfo.reason")
    expect_eq(infos[0].domain, "tally.v1", "ErrorInfo.domain")
    expect_eq(dict(infos[0].metadata).get("requested"), "1000", "ErrorInfo.metadata.requested")
    expect_eq(dict(infos[0].metadata).get("available"), "85", "ErrorInfo.metadata.available")
    # Nothing changed.
    r = credit.CheckBalance(pb.CheckBalanceRequest(account_id=ACCOUNT), metadata=AUTH, timeout=TIMEOUT)
    expect_eq((r.available, r.held), (85, 0), "CheckBalance after the refused Reserve")


check("health: '', liveness, readiness are SERVING", check_health_serving)
check("health: unknown service is NOT_FOUND", check_health_unknown)
check("reflection v1: services listed, CreditService descriptor", check_reflection("v1"))
check("reflection v1alpha: services listed, CreditService descriptor", check_reflection("v1alpha"))
check("reflection v1/v1alpha without a token: UNAUTHENTICATED", check_reflection_needs_token)
check("CreditService without/with an unknown token: UNAUTHENTICATED", check_credit_needs_token)
check("AdminService.Grant 100", check_grant)
check("Reserve 30: hold OPEN, available 70", check_reserve)
check("Reserve replayed: same hold, tally-idempotent-replay: true", check_reserve_replay)
check("Commit 20: released 10, available 80", check_commit)
check("Refund 5 of the committed hold: available 85", check_refund)
check("CheckBalance: available 85, held 0; GetHold settled", check_balance)
check("Reserve 1000: FAILED_PRECONDITION, ErrorInfo INSUFFICIENT_CREDITS/tally.v1", check_insufficient_credits)

channel.close()
print(f"python-client: {len(passed)} passed, {len(failed)} failed", flush=True)
sys.exit(1 if failed else 0)
