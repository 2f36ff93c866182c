"""The client half of scripts/image_test.sh: talks to deployd running in the image.

    python scripts/image_smoke.py --address HOST:PORT --metrics-url URL --http-url URL --package LOCAL.pt \
        --server-path NAME.pt --data-ports FIRST-LAST

With the admin token in $DEPLOYD_TOKEN (never on the command line: ps shows it). Loads the package
from the container's package volume by server_path, serves its model by name, calls it through the
daemon's port, and checks the answers against the same package unpickled here; then that a call
without a token is refused (the image binds 0.0.0.0) and that /metrics counted the calls; KServe v2
over HTTP with curl (health, a JSON infer by name, a call without a token refused). Then the
direct path: the daemon's Endpoints names a data port per worker, each published on this host
(FIRST-LAST), Invoke on each answers as the daemon path does, and the Python client from this host
goes straight to the workers (the daemon's Status counts none of its calls). Exits nonzero, saying
why, on the first thing that is wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings

import grpc
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch.package import PackageImporter

from client import InterpreterManager, UnauthenticatedError
from deployd_wire.proto import deployd_pb2 as pb
from deployd_wire.proto import deployd_pb2_grpc as pb_grpc

# torch.package's own use of a deprecated torch API, nothing of ours.
warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)

NAME = "seed"
CALLS = 3
GENERATION_KEY = "deployd-endpoints-generation"


def check_model(address: str, package: str, server_path: str) -> None:
    local = PackageImporter(package).load_pickle("model", "model.pkl")
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.rand(2, 1, 10, 10, generator=generator) for _ in range(CALLS)]
    # The daemon's path (direct=False): /metrics counts its calls (check_metrics); the direct path
    # is check_direct's.
    with InterpreterManager(address, direct=False) as manager:
        workers = manager.status().workers
        assert workers and all(worker.state in ("idle", "busy") for worker in workers), f"workers: {workers}"
        loaded = manager.load_package(server_path=server_path).load_pickle("model", "model.pkl", name=NAME)
        by_name = manager.model(NAME)
        for index, x in enumerate(inputs):
            # the handle load_pickle returned first, then the name alone, as a caller without it would
            remote = (loaded if index == 0 else by_name)(x)
            expected = local(x)
            assert isinstance(remote, torch.Tensor), f"the model returned {type(remote).__name__}"
            assert remote.shape == expected.shape and remote.dtype == expected.dtype, (remote.shape, remote.dtype)
            assert torch.isfinite(remote).all(), "the model returned non-finite values"
            # Same wheel, same CPU: equal in practice; the tolerance only allows for a different thread
            # count (the workers run one intra-op thread each).
            torch.testing.assert_close(remote, expected)
        exact = all(torch.equal(by_name(x), local(x)) for x in inputs)
        print(f"image-smoke: {len(workers)} workers; {NAME} answered {2 * CALLS} calls like the local model")
        print(f"image-smoke: bit for bit: {'yes' if exact else 'no (within float32 tolerance)'}")


def check_auth(address: str) -> None:
    # token="": no token at all (None would take $DEPLOYD_TOKEN).
    with InterpreterManager(address, token="") as anonymous:
        try:
            anonymous.model(NAME)(torch.ones(1, 1, 10, 10))
        except UnauthenticatedError:
            print("image-smoke: a call without a token is refused (UNAUTHENTICATED)")
            return
    raise AssertionError("a call without a token was served")


def check_metrics(url: str) -> None:
    # The counters are updated once each answer is sent: allow a moment for the last one.
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        counted = sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "deployd_calls"
            for sample in family.samples
            if sample.name == "deployd_calls_total"
            and sample.labels.get("model") == NAME
            and sample.labels.get("code") == "OK"
        )
        if counted >= 2 * CALLS or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert counted >= 2 * CALLS, f"/metrics counts {counted} OK calls to {NAME}, expected at least {2 * CALLS}"
    print(f"image-smoke: /metrics counts {counted:.0f} OK calls to {NAME}")


def tensor_value(tensor: torch.Tensor) -> pb.Value:
    """A float32 tensor as deployd.v1's Value, as any gRPC client builds it from the .proto."""
    data = tensor.contiguous().numpy().tobytes()
    return pb.Value(tensor_value=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=list(tensor.shape), data=data))


def tensor_of(value: pb.Value) -> torch.Tensor:
    wire = value.tensor_value
    assert wire.dtype == pb.DTYPE_FLOAT32, f"the model returned {pb.DType.Name(wire.dtype)}"
    return torch.frombuffer(bytearray(wire.data), dtype=torch.float32).reshape(list(wire.shape))


def invoke(target: str, x: torch.Tensor, token: str) -> tuple[torch.Tensor, dict[str, str]]:
    """deployd.v1 Invoke of the model by name on one port: the daemon's or a worker's."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(target) as channel:
        response, call = pb_grpc.DeploydStub(channel).Invoke.with_call(
            pb.InvokeRequest(object_id=NAME, args=[tensor_value(x)]), timeout=60, metadata=metadata
        )
    return tensor_of(response.result), dict(call.trailing_metadata() or ())


class Relay:
    """A TCP relay in front of the daemon's port that counts the bytes a client sends through it:
    what reached the daemon, whatever its Status or /metrics count (both count the data ports'
    calls too)."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self.sent = 0  # bytes from clients to the daemon
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            daemon = socket.create_connection(self._target)
            threading.Thread(target=self._pump, args=(client, daemon, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(daemon, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, counted: bool) -> None:
        try:
            while data := source.recv(65536):
                if counted:
                    with self._lock:
                        self.sent += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()


def check_direct(address: str, data_ports: range) -> None:
    token = os.environ.get("DEPLOYD_TOKEN", "")
    metadata = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(address) as channel:
        answer = pb_grpc.DeploydStub(channel).Endpoints(pb.EndpointsRequest(), timeout=30, metadata=metadata)
    published = {f"127.0.0.1:{port}" for port in data_ports}
    advertised = {worker.address for worker in answer.workers}
    # The image advertises 127.0.0.1 and its ports' own numbers: those published on this host.
    assert advertised == published, f"Endpoints names {sorted(advertised)}, this host publishes {sorted(published)}"
    assert all(NAME in worker.models for worker in answer.workers), [list(w.models) for w in answer.workers]
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 10, 10, generator=generator)
    by_daemon, _ = invoke(address, x, token)
    for worker in answer.workers:
        direct, trailers = invoke(worker.address, x, token)
        torch.testing.assert_close(direct, by_daemon, rtol=0, atol=0)
        assert int(trailers.get(GENERATION_KEY, -1)) == answer.generation, trailers
        # The data ports take the daemon's tokens: none, no call.
        try:
            invoke(worker.address, x, "")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        else:
            raise AssertionError(f"a call without a token was served on {worker.address}")
    print(
        f"image-smoke: Endpoints: {len(answer.workers)} data ports ({', '.join(sorted(advertised))});"
        " Invoke on each answers as the daemon path does, bit for bit; without a token: UNAUTHENTICATED"
    )

    # The Python client from this host takes the data ports by default: the calls' tensors never
    # cross the daemon's port (counted by a relay in front of it), only the Endpoints call does.
    big = torch.rand(1, 1, 32, 32, generator=generator)  # 4 KiB a call
    calls = 4 * len(answer.workers)
    relay = Relay(address)
    try:
        expected, _ = invoke(address, big, token)
        with InterpreterManager(relay.address) as manager:
            model = manager.model(NAME)
            for _ in range(calls):
                assert torch.equal(model(big), expected)
        direct_bytes = relay.sent
        with InterpreterManager(relay.address, direct=False) as manager:
            assert torch.equal(manager.model(NAME)(big), expected)
        daemon_bytes = relay.sent - direct_bytes
    finally:
        relay.close()
    tensor_bytes = big.numel() * big.element_size()
    assert daemon_bytes >= tensor_bytes, f"the relay counted {daemon_bytes} bytes for a {tensor_bytes}-byte call"
    assert direct_bytes < tensor_bytes, (
        f"the client sent the daemon {direct_bytes} bytes for {calls} calls of {tensor_bytes} bytes:"
        " its calls went through the daemon, not the data ports"
    )
    print(
        f"image-smoke: the Python client's {calls} calls ({tensor_bytes} bytes each) went straight to the"
        f" workers: {direct_bytes} bytes to the daemon's port (Endpoints), against {daemon_bytes} for one call"
        " through it"
    )


def check_http(url: str, package: str) -> None:
    """KServe v2 over HTTP with curl, as the README shows it: health without a token, a JSON
    infer of the model by name (the same answer as the local model), and a call without a
    token refused."""
    ready = _curl(f"{url}/v2/health/ready")
    assert ready == (200, {"ready": True}), f"GET /v2/health/ready: {ready}"
    x = torch.rand(1, 1, 10, 10, generator=torch.Generator().manual_seed(1))
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1, 10, 10], "data": x.tolist()}]})
    token = os.environ["DEPLOYD_TOKEN"]
    status, answer = _curl(f"{url}/v2/models/{NAME}/infer", body, token)
    assert status == 200, f"POST /v2/models/{NAME}/infer: {status} {answer}"
    [output] = answer["outputs"]
    remote = torch.tensor(output["data"], dtype=torch.float32).reshape(output["shape"])
    torch.testing.assert_close(remote, PackageImporter(package).load_pickle("model", "model.pkl")(x))
    refused = _curl(f"{url}/v2/models/{NAME}/infer", body)
    assert refused[0] == 401, f"an infer without a token: {refused}"
    print(f"image-smoke: HTTP: ready, a JSON infer of {NAME} answers as the local model, no token: 401")


def _curl(url: str, body: str | None = None, token: str = "") -> tuple[int, object]:
    """(status, the JSON body) of curl's request; the token travels in a header file, not argv."""
    command = ["curl", "-sS", "--max-time", "60", "-o", "-", "-w", "\\n%{http_code}", url]
    headers = f"Authorization: Bearer {token}\n" if token else ""
    if body is not None:
        command += ["-X", "POST", "-H", "Content-Type: application/json", "--data-binary", "@-"]
    if headers:
        command += ["-H", "@/dev/fd/3"]
    read, write = os.pipe()
    try:
        with os.fdopen(write, "w") as header_file:
            header_file.write(headers)
        result = subprocess.run(
            command,
            input=body or "",
            capture_output=True,
            text=True,
            timeout=90,
            pass_fds=(read,),
            preexec_fn=lambda: os.dup2(read, 3),
        )
    finally:
        os.close(read)
    assert result.returncode == 0, f"curl {url}: {result.stderr.strip()}"
    text, _, code = result.stdout.rpartition("\n")
    return int(code), json.loads(text) if text.strip() else None


def port_range(text: str) -> range:
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True, help="the container's gRPC port on this host")
    parser.add_argument("--metrics-url", required=True, help="the container's /metrics on this host")
    parser.add_argument("--package", required=True, help="this host's copy of the package")
    parser.add_argument("--server-path", required=True, help="the package's path in the container's package directory")
    parser.add_argument("--http-url", required=True, help="the container's HTTP port on this host (http://HOST:PORT)")
    parser.add_argument(
        "--data-ports", required=True, type=port_range, help="FIRST-LAST: the workers' data ports on this host"
    )
    options = parser.parse_args()
    try:
        check_model(options.address, options.package, options.server_path)
        check_auth(options.address)
        check_metrics(options.metrics_url)
        check_http(options.http_url, options.package)
        check_direct(options.address, options.data_ports)
    except AssertionError as error:
        print(f"image-smoke: FAILED: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
