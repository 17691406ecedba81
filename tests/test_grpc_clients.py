"""The same operations through grpcurl (reflection only, no proto files) and the generated
Python stub, against the dispatcher's public gRPC port."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tests.conftest import RunningStack
from upw.account.v1 import account_pb2, account_pb2_grpc
from upw.gateway.v1 import gateway_pb2, gateway_pb2_grpc

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"


def grpcurl(stack: RunningStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def call(stack: RunningStack, method: str, request: dict[str, object]) -> dict[str, object]:
    result = grpcurl(stack, "-d", json.dumps(request), stack.grpc_target, method)
    assert result.returncode == 0, result.stderr
    reply: dict[str, object] = json.loads(result.stdout)
    return reply


def test_grpcurl_with_reflection(stack: RunningStack) -> None:
    listed = grpcurl(stack, stack.grpc_target, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"upw.account.v1.AccountService", "upw.gateway.v1.TextGateway",
            "grpc.health.v1.Health"} <= set(listed.stdout.split())

    assert call(stack, "upw.account.v1.AccountService/CreateAccount", {"user": "chrono"})[
        "created"] is True
    for _ in range(2):
        call(stack, "upw.account.v1.AccountService/Deposit", {"user": "chrono", "amount": 128})
    assert call(stack, "upw.account.v1.AccountService/GetAccount", {"user": "chrono"})[
        "balance"] == "256"
    text = call(stack, "upw.gateway.v1.TextGateway/Show", {"user": "chrono"})
    assert base64.b64decode(str(text["data"])) == b"chrono's account is 256 yen.\n"

    missing = grpcurl(stack, "-d", '{"user": "nobody"}', stack.grpc_target,
                      "upw.account.v1.AccountService/GetAccount")
    assert missing.returncode != 0
    assert "NotFound" in missing.stderr


def test_python_stub(stack: RunningStack) -> None:
    with grpc.insecure_channel(stack.grpc_target) as channel:
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        created = accounts.CreateAccount(account_pb2.CreateAccountRequest(user="lindy"))
        assert created.created and created.account.balance == 0
        for amount in (128, 128):
            accounts.Deposit(account_pb2.DepositRequest(user="lindy", amount=amount))
        withdrawn = accounts.Withdraw(account_pb2.WithdrawRequest(user="lindy", amount=6))
        assert withdrawn.account.balance == 250
        assert withdrawn.entry.kind == account_pb2.LedgerEntry.KIND_WITHDRAWAL
        page = accounts.ListTransactions(
            account_pb2.ListTransactionsRequest(user="lindy", page_size=2))
        assert [e.seq for e in page.entries] == [1, 2] and page.next_after_seq == 2

        with pytest.raises(grpc.RpcError) as refused:
            accounts.Withdraw(account_pb2.WithdrawRequest(user="lindy", amount=10_000))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        with pytest.raises(grpc.RpcError) as bad:
            accounts.GetAccount(account_pb2.GetAccountRequest(user="../etc"))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        gateway = gateway_pb2_grpc.TextGatewayStub(channel)
        body = gateway.Show(gateway_pb2.UserRequest(user="lindy"))
        assert body.data == b"lindy's account is 250 yen.\n"
