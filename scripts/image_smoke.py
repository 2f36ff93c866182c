"""The client half of scripts/image_test.sh: talks to deployd running in the image.

    python scripts/image_smoke.py --address HOST:PORT --metrics-url URL --package LOCAL.pt --server-path NAME.pt

With the admin token in $DEPLOYD_TOKEN (never on the command line: ps shows it). Loads the package
from the container's package volume by server_path, serves its model by name, calls it, and checks
the answers against the same package unpickled here; then that a call without a token is refused
(the image binds 0.0.0.0) and that /metrics counted the calls. Exits nonzero, saying why, on the
first thing that is wrong.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request
import warnings

import torch
from prometheus_client.parser import text_string_to_metric_families
from torch.package import PackageImporter

from client import InterpreterManager, UnauthenticatedError

# torch.package's own use of a deprecated torch API, nothing of ours.
warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)

NAME = "seed"
CALLS = 3


def check_model(address: str, package: str, server_path: str) -> None:
    local = PackageImporter(package).load_pickle("model", "model.pkl")
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.rand(2, 1, 10, 10, generator=generator) for _ in range(CALLS)]
    with InterpreterManager(address) as manager:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True, help="the container's gRPC port on this host")
    parser.add_argument("--metrics-url", required=True, help="the container's /metrics on this host")
    parser.add_argument("--package", required=True, help="this host's copy of the package")
    parser.add_argument("--server-path", required=True, help="the package's path in the container's package directory")
    options = parser.parse_args()
    try:
        check_model(options.address, options.package, options.server_path)
        check_auth(options.address)
        check_metrics(options.metrics_url)
    except AssertionError as error:
        print(f"image-smoke: FAILED: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
