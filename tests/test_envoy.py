"""The Envoy front door: launcher/envoy_config.py and envoy/envoy.yaml.tmpl.

Real Envoy runs in front of a small in-test gRPC server with canned answers (this tests the
Envoy configuration, not the dispatcher or the ETL; the full stack is tested elsewhere). The
fake serves TextGateway and AccountService on the dispatcher port and SummaryService on the
ETL socket, and records every request it receives so a test can see what Envoy sent.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.api import httpbody_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from conventions.config import Settings
from launcher import envoy_config
from upw.account.v1 import account_pb2, account_pb2_grpc
from upw.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from upw.summary.v1 import summary_pb2, summary_pb2_grpc

TEXT = "text/plain; charset=utf-8"
READY_TIMEOUT = 20.0

# GET /v1/accounts/<user> for these users makes the fake answer with this status.
ERRORS = {
    "bad-name": (grpc.StatusCode.INVALID_ARGUMENT, "user name 'Bad' is invalid", 400),
    "nobody": (grpc.StatusCode.NOT_FOUND, "account 'nobody' does not exist", 404),
    "poor": (grpc.StatusCode.FAILED_PRECONDITION, "insufficient funds: balance 3", 400),
    "rich": (grpc.StatusCode.OUT_OF_RANGE, "amount too large for the balance", 400),
    "busy": (grpc.StatusCode.RESOURCE_EXHAUSTED, "worker cap reached", 429),
    "down": (grpc.StatusCode.UNAVAILABLE, "worker could not start", 503),
}


# --- the fake upstream -------------------------------------------------------------------


@dataclass
class Calls:
    """Every request message the fake received, by method name."""

    seen: dict[str, list[Any]] = field(default_factory=dict)

    def add(self, method: str, request: Any) -> None:
        self.seen.setdefault(method, []).append(request)

    def last(self, method: str) -> Any:
        return self.seen[method][-1]


def _text(data: str) -> httpbody_pb2.HttpBody:
    return httpbody_pb2.HttpBody(content_type=TEXT, data=data.encode())


class FakeGateway(gateway_pb2_grpc.TextGatewayServicer):
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def Create(
        self, request: gateway_pb2.UserRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> httpbody_pb2.HttpBody:
        self.calls.add("Create", request)
        return _text(f"Hello, {request.user}. Welcome Unlimited Process Works!\n")

    async def Deposit(
        self, request: gateway_pb2.TextDepositRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> httpbody_pb2.HttpBody:
        self.calls.add("TextDeposit", request)
        return _text(f"{request.user}'s account deposit {request.amount} yen.\n")

    async def Show(
        self, request: gateway_pb2.UserRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> httpbody_pb2.HttpBody:
        self.calls.add("Show", request)
        return _text(f"{request.user}'s account is 256 yen.\n")

    async def AccountSummary(
        self,
        request: gateway_pb2.AccountSummaryRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> httpbody_pb2.HttpBody:
        self.calls.add("AccountSummary", request)
        return _text("koduki, 256\nmisuzu, 0\n")


class FakeAccounts(account_pb2_grpc.AccountServiceServicer):
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def CreateAccount(
        self,
        request: account_pb2.CreateAccountRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> account_pb2.CreateAccountResponse:
        self.calls.add("CreateAccount", request)
        return account_pb2.CreateAccountResponse(
            account=account_pb2.Account(user=request.user), created=True
        )

    async def Withdraw(
        self, request: account_pb2.WithdrawRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> account_pb2.BalanceChange:
        self.calls.add("Withdraw", request)
        return account_pb2.BalanceChange(account=account_pb2.Account(user=request.user))

    async def Deposit(
        self, request: account_pb2.DepositRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> account_pb2.BalanceChange:
        self.calls.add("Deposit", request)
        return account_pb2.BalanceChange(
            account=account_pb2.Account(user=request.user, balance=request.amount, last_seq=2),
            entry=account_pb2.LedgerEntry(
                seq=2,
                kind=account_pb2.LedgerEntry.KIND_DEPOSIT,
                amount=request.amount,
                balance=request.amount,
            ),
        )

    async def GetAccount(
        self, request: account_pb2.GetAccountRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> account_pb2.Account:
        self.calls.add("GetAccount", request)
        if request.user in ERRORS:
            code, message, _ = ERRORS[request.user]
            await context.abort(code, message)
        return account_pb2.Account(user=request.user, balance=0, last_seq=1)

    async def ListTransactions(
        self,
        request: account_pb2.ListTransactionsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> account_pb2.ListTransactionsResponse:
        self.calls.add("ListTransactions", request)
        return account_pb2.ListTransactionsResponse()


class FakeSummary(summary_pb2_grpc.SummaryServiceServicer):
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def GetSummary(
        self, request: summary_pb2.GetSummaryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> summary_pb2.GetSummaryResponse:
        self.calls.add("GetSummary", request)
        count = request.page_size or 2
        return summary_pb2.GetSummaryResponse(
            accounts=[
                summary_pb2.AccountBalance(user=f"user-{i:07d}", balance=i, last_seq=i)
                for i in range(count)
            ]
        )

    async def GetSummaryText(
        self, request: summary_pb2.GetSummaryTextRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> summary_pb2.SummaryText:
        raise AssertionError("Envoy routes no path to GetSummaryText")


class FakeUpstream:
    """The dispatcher's and the ETL's gRPC services, with canned answers, in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.calls = Calls()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._servers: list[grpc.aio.Server] = []

    async def _start(self) -> None:
        health_servicer = health.aio.HealthServicer()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

        dispatcher = grpc.aio.server()
        gateway_pb2_grpc.add_TextGatewayServicer_to_server(FakeGateway(self.calls), dispatcher)
        account_pb2_grpc.add_AccountServiceServicer_to_server(FakeAccounts(self.calls), dispatcher)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, dispatcher)
        dispatcher.add_insecure_port(f"0.0.0.0:{self.settings.grpc_port}")

        etl = grpc.aio.server(options=[("grpc.max_send_message_length", 128 * 1024 * 1024)])
        summary_pb2_grpc.add_SummaryServiceServicer_to_server(FakeSummary(self.calls), etl)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, etl)
        self.settings.etl_socket.parent.mkdir(parents=True, exist_ok=True)
        etl.add_insecure_port(f"unix:{self.settings.etl_socket}")

        for server in (dispatcher, etl):
            await server.start()
            self._servers.append(server)

    async def _stop(self) -> None:
        for server in self._servers:
            await server.stop(None)

    def start(self) -> FakeUpstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


# --- Envoy -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _settings() -> Settings:
    # A short run dir: a unix socket path may not exceed 107 bytes.
    run_dir = Path(tempfile.mkdtemp(prefix="upw-"))
    return Settings(
        http_port=_free_port(),
        grpc_port=_free_port(),
        data_dir=run_dir / "data",
        run_dir_override=run_dir,
    )


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=5)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.socket_path))


def _ready(settings: Settings) -> bool:
    conn = UnixHTTPConnection(envoy_config.admin_socket(settings))
    try:
        conn.request("GET", "/ready")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@dataclass
class Envoy:
    settings: Settings
    process: subprocess.Popen[bytes]
    startup_s: float

    def get(self, path: str) -> tuple[int, str, bytes]:
        return self.request("GET", path)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, str, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.settings.http_port, timeout=30)
        try:
            headers = {"content-type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheader("content-type", ""), response.read()
        finally:
            conn.close()


def _start_envoy(settings: Settings) -> Envoy:
    config = envoy_config.write_config(settings, settings.run_dir / "envoy.yaml")
    started = time.monotonic()
    process = subprocess.Popen(envoy_config.envoy_command(config, settings))
    while not _ready(settings):
        if process.poll() is not None:
            raise AssertionError(f"envoy exited with {process.returncode}")
        if time.monotonic() - started > READY_TIMEOUT:
            process.kill()
            raise AssertionError("envoy did not become ready")
        time.sleep(0.02)
    return Envoy(settings, process, time.monotonic() - started)


def _stop_envoy(envoy: Envoy) -> None:
    envoy.process.terminate()
    try:
        envoy.process.wait(10)
    except subprocess.TimeoutExpired:
        envoy.process.kill()
        envoy.process.wait()
    shutil.rmtree(envoy.settings.run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream(_settings()).start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="module")
def envoy(upstream: FakeUpstream) -> Iterator[Envoy]:
    proxy = _start_envoy(upstream.settings)
    try:
        yield proxy
    finally:
        _stop_envoy(proxy)


def _error(body: bytes) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(body)
    return decoded


# --- the configuration -------------------------------------------------------------------


def test_rendered_config_validates(tmp_path: Path) -> None:
    settings = _settings()
    try:
        config = envoy_config.write_config(settings, settings.run_dir / "envoy.yaml")
        text = config.read_text()
        assert str(envoy_config.DESCRIPTOR_SET) in text
        assert str(settings.etl_socket) in text
        command = envoy_config.envoy_command(config, settings)
        assert "--disable-hot-restart" in command
        assert command[command.index("--log-level") + 1] == "warning"
        result = subprocess.run(
            [*command, "--mode", "validate"], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr
    finally:
        shutil.rmtree(settings.run_dir)


def test_envoy_binary_comes_from_this_environment() -> None:
    binary = envoy_config.envoy_binary()
    assert binary.is_file()
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True)
    assert "version" in out.stdout


def test_missing_descriptor_set_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make gen"):
        envoy_config.render(Settings(), descriptor_set=tmp_path / "missing.pb")


# --- the original text routes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/koduki/create", "Hello, koduki. Welcome Unlimited Process Works!\n"),
        ("/koduki/deposit/128", "koduki's account deposit 128 yen.\n"),
        ("/koduki/show", "koduki's account is 256 yen.\n"),
        ("/account_summary", "koduki, 256\nmisuzu, 0\n"),
    ],
)
def test_text_routes_pass_bytes_through(envoy: Envoy, path: str, body: str) -> None:
    status, content_type, data = envoy.get(path)
    assert (status, content_type, data) == (200, TEXT, body.encode())


# --- the JSON routes ---------------------------------------------------------------------


def test_json_deposit(envoy: Envoy, upstream: FakeUpstream) -> None:
    status, content_type, data = envoy.request(
        "POST", "/v1/accounts/koduki:deposit", json.dumps({"amount": "5"}).encode()
    )
    assert status == 200
    assert content_type == "application/json"
    answer = json.loads(data)
    assert answer["account"] == {"user": "koduki", "balance": "5", "lastSeq": "2"}
    assert answer["entry"]["kind"] == "KIND_DEPOSIT"
    request = upstream.calls.last("Deposit")
    assert (request.user, request.amount) == ("koduki", 5)


def test_zero_fields_are_printed(envoy: Envoy) -> None:
    status, _, data = envoy.get("/v1/accounts/misuzu")
    assert status == 200
    assert json.loads(data) == {"user": "misuzu", "balance": "0", "lastSeq": "1"}


def test_summary_goes_to_the_etl(envoy: Envoy, upstream: FakeUpstream) -> None:
    status, content_type, data = envoy.get("/v1/summary")
    assert (status, content_type) == (200, "application/json")
    summary = json.loads(data)
    assert [a["user"] for a in summary["accounts"]] == ["user-0000000", "user-0000001"]
    assert summary["accounts"][0]["balance"] == "0"
    assert summary["nextPageToken"] == ""


def test_big_summary_passes(envoy: Envoy) -> None:
    # About 20 MiB of JSON: beyond every default buffer limit of Envoy (1 MiB).
    status, _, data = envoy.get("/v1/summary?page_size=300000")
    assert status == 200, data[:200]
    assert len(data) > 16 * 1024 * 1024
    assert len(json.loads(data)["accounts"]) == 300000


def test_allowed_query_parameters_reach_grpc(envoy: Envoy, upstream: FakeUpstream) -> None:
    status, _, _ = envoy.get("/v1/accounts/koduki/transactions?afterSeq=3&page_size=10")
    assert status == 200
    request = upstream.calls.last("ListTransactions")
    assert (request.user, request.after_seq, request.page_size) == ("koduki", 3, 10)


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("user", sorted(ERRORS))
def test_grpc_status_becomes_http_status(envoy: Envoy, user: str) -> None:
    code, message, http_status = ERRORS[user]
    status, content_type, data = envoy.get(f"/v1/accounts/{user}")
    assert status == http_status
    assert content_type == "application/json"
    assert _error(data) == {"code": code.value[0], "message": message, "details": []}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/nope"),
        ("GET", "/koduki/explode"),
        ("GET", "/koduki/deposit"),
        ("GET", "/koduki/create/extra"),
        ("POST", "/koduki/create"),
        ("GET", "/upw.gateway.v1.TextGateway/Create"),
        ("POST", "/upw.account.v1.AccountService/GetAccount"),
        ("GET", "/v1/summary/x"),
    ],
)
def test_unknown_paths_are_404(envoy: Envoy, method: str, path: str) -> None:
    status, content_type, data = envoy.request(method, path)
    assert (status, content_type) == (404, "application/json"), data
    assert _error(data)["code"] == grpc.StatusCode.NOT_FOUND.value[0]


def test_unknown_path_names_itself(envoy: Envoy) -> None:
    _, _, data = envoy.get("/nope")
    assert _error(data)["message"] == "Could not resolve /nope to a method."


def test_unknown_query_parameter_is_400(envoy: Envoy) -> None:
    status, _, data = envoy.get("/koduki/show?colour=red")
    assert status == 400
    error = _error(data)
    assert error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert '"colour"' in error["message"]


# --- path variables cannot be overridden -------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "name"),
    [
        ("GET", "/koduki/show?user=misuzu", "user"),
        ("GET", "/koduki/create?user=misuzu", "user"),
        ("GET", "/koduki/deposit/1?amount=999", "amount"),
        ("GET", "/koduki/deposit/1?user=misuzu", "user"),
        ("GET", "/koduki/show?%75ser=misuzu", "user"),
        ("GET", "/koduki/show?%75%73%65%72=misuzu", "user"),
        ("GET", "/koduki/show?USER=misuzu", "user"),
        ("GET", "/koduki/show?x=1&user", "user"),
        ("GET", "/account_summary?user=misuzu", "user"),
        ("GET", "/v1/accounts/koduki?user=misuzu", "user"),
        ("GET", "/v1/summary?amount=1", "amount"),
        ("POST", "/v1/accounts/koduki:deposit?user=misuzu", "user"),
        ("POST", "/v1/accounts/koduki:deposit?amount=999", "amount"),
    ],
)
def test_query_cannot_override_path_fields(
    envoy: Envoy, upstream: FakeUpstream, method: str, path: str, name: str
) -> None:
    before = sum(len(v) for v in upstream.calls.seen.values())
    body = json.dumps({"amount": "5"}).encode() if method == "POST" else None
    status, content_type, data = envoy.request(method, path, body)
    assert (status, content_type) == (400, "application/json")
    error = _error(data)
    assert error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert f"query parameter '{name}' is not allowed" in error["message"]
    assert sum(len(v) for v in upstream.calls.seen.values()) == before


@pytest.mark.parametrize(
    "query", ["%2575ser=misuzu", "user+=misuzu", "user.x=1", "us%2Ber=misuzu", "after_seq=x"]
)
def test_other_spellings_are_refused_by_the_transcoder(
    envoy: Envoy, upstream: FakeUpstream, query: str
) -> None:
    """Whatever the Lua guard lets through is not a field name, so the transcoder refuses it."""
    before = sum(len(v) for v in upstream.calls.seen.values())
    status, _, data = envoy.get(f"/koduki/show?{query}")
    assert status == 400, data
    assert _error(data)["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert sum(len(v) for v in upstream.calls.seen.values()) == before


def test_body_cannot_override_path_user(envoy: Envoy, upstream: FakeUpstream) -> None:
    before = len(upstream.calls.seen.get("Deposit", []))
    body = json.dumps({"user": "misuzu", "amount": "5"}).encode()
    status, _, data = envoy.request("POST", "/v1/accounts/koduki:deposit", body)
    assert status == 400
    assert "conflicting" in _error(data)["message"]
    assert len(upstream.calls.seen.get("Deposit", [])) == before


# --- what %2F and .. turn into -----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "user"),
    [
        # A segment arrives exactly as sent (percent-decoded) in the user field, never as a
        # different path: the dispatcher refuses every one of these names.
        ("/a%2Fb/show", "a/b"),
        ("/a%2fb/show", "a/b"),
        ("/..%2F..%2Fetc/show", "../../etc"),
        ("/../show", ".."),
        ("/%2E%2E/show", ".."),
        ("/./show", "."),
        ("//show", ""),
        ("/a%5Cb/show", "a\\b"),
        ("/a%252Fb/show", "a%2Fb"),
        ("/ko%64uki/show", "koduki"),  # %64 is "d"
    ],
)
def test_path_segments_arrive_as_the_user_field(
    envoy: Envoy, upstream: FakeUpstream, path: str, user: str
) -> None:
    status, _, data = envoy.get(path)
    assert status == 200, data
    assert upstream.calls.last("Show").user == user


def test_encoded_slash_in_amount_stays_in_the_field(envoy: Envoy, upstream: FakeUpstream) -> None:
    status, _, _ = envoy.get("/koduki/deposit/1%2F2")
    assert status == 200
    request = upstream.calls.last("TextDeposit")
    assert (request.user, request.amount) == ("koduki", "1/2")


@pytest.mark.parametrize(
    "path", ["/koduki/../misuzu/show", "/koduki/%2E%2E/misuzu/show", "/koduki//show", "/.."]
)
def test_dot_segments_are_not_resolved(envoy: Envoy, path: str) -> None:
    """No normalisation: ".." is an ordinary segment, so these match no template."""
    status, _, data = envoy.get(path)
    assert status == 404, data


# --- side by side ------------------------------------------------------------------------


def test_two_stacks_run_at_once(envoy: Envoy) -> None:
    """A second Envoy beside the first; its upstream starts only after Envoy is ready, and the
    very first request must still succeed (panic mode while the health check has not passed)."""
    settings = _settings()
    second = _start_envoy(settings)
    fake = None
    try:
        status, content_type, data = second.get("/misuzu/create")
        assert (status, content_type) == (503, "application/json")
        assert _error(data)["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
        fake = FakeUpstream(settings).start()
        status, _, data = second.get("/misuzu/create")
        assert (status, data) == (200, b"Hello, misuzu. Welcome Unlimited Process Works!\n")
        status, _, data = second.get("/v1/summary")
        assert status == 200, data
        assert envoy.get("/koduki/show")[0] == 200
    finally:
        if fake is not None:
            fake.stop()
        _stop_envoy(second)


def test_envoy_becomes_ready_quickly(envoy: Envoy) -> None:
    assert envoy.startup_s < 5.0
