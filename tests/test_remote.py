"""dmlkit.connect against `dask scheduler` / `dask worker` started as separate processes.

Plain TCP (address, DMLKIT_SCHEDULER, scheduler file), TLS with certificates made here,
a version mismatch, an unreachable address, and a notebook run on such a scheduler.
"""
from __future__ import annotations

import datetime
import ipaddress
import time
from pathlib import Path

import dask
import numpy as np
import psutil
import pytest
from numpy.testing import assert_array_equal

import dmlkit
from dmlkit import KMeans
from dmlkit.connect import SchedulerConnectionError, SchedulerVersionError, connect
from _processes import ROOT, dask_scheduler, dask_workers, execute_notebook, notebook_env
from conftest import write_store

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("no_scheduler_variables")]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(1)
    centers = rng.uniform(-5, 5, size=(4, 3))
    X = (centers[rng.integers(0, 4, 12_000)] + rng.standard_normal((12_000, 3))).astype(np.float32)
    return write_store(tmp_path_factory.mktemp("remote") / "blobs.zarr", X, chunk_rows=1500)


@pytest.fixture(scope="module")
def reference(store):
    # cache=False: streamed from the store, the blocks and the tree are those of the store
    # whatever the cluster, so the answer is the same to the bit (as it is for a cached
    # copy, whose blocks depend on the data alone: tests/test_distributed.py)
    with dask.config.set(scheduler="sync"):
        return KMeans(4, random_state=0, cache=False).fit(store)


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """A `dask scheduler` process and two `dask worker` processes (with nannies) on 127.0.0.1."""
    folder = tmp_path_factory.mktemp("tcp")
    with dask_scheduler(folder) as scheduler, dask_workers(scheduler.address, folder, n=2):
        yield scheduler


def assert_same_fit(client, store, reference):
    km = KMeans(4, random_state=0, cache=False).fit(store)
    assert_array_equal(km.cluster_centers_, reference.cluster_centers_)
    assert km.inertia_ == reference.inertia_ and km.n_iter_ == reference.n_iter_
    # the work ran on the remote workers, not in this process
    assert client.cluster is None and len(client.nthreads()) == 2


@pytest.mark.parametrize("how", ["address", "DMLKIT_SCHEDULER", "scheduler_file",
                                 "DMLKIT_SCHEDULER_FILE"])
def test_kmeans_on_separate_processes_equals_sync_fit(remote, store, reference, how, monkeypatch,
                                                      capsys):
    if how == "address":
        client = connect(remote.address)
    elif how == "scheduler_file":
        client = connect(scheduler_file=remote.scheduler_file)
    else:
        monkeypatch.setenv(how, remote.address if how == "DMLKIT_SCHEDULER" else remote.scheduler_file)
        client = connect()
    with client:
        assert client.scheduler.address == remote.address
        assert_same_fit(client, store, reference)
    assert f"connected to {remote.address} (2 workers" in capsys.readouterr().out
    assert remote.proc.poll() is None  # a remote scheduler is left running


# --- TLS ----------------------------------------------------------------------------------


def _make_ca(name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _write_pair(folder: Path, stem: str, ca, name: str) -> tuple[str, str]:
    """A certificate for ``name`` signed by ``ca`` (server and client use, SAN 127.0.0.1)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return str(cert_path), str(key_path)


def _write_ca(folder: Path, stem: str, ca) -> str:
    from cryptography.hazmat.primitives import serialization

    path = folder / f"{stem}.pem"
    path.write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    return str(path)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A TLS-only scheduler and one worker, certificates from a CA made here; and a rogue CA."""
    pytest.importorskip("cryptography")
    from distributed.security import Security

    folder = tmp_path_factory.mktemp("tls")
    ca, rogue = _make_ca("dmlkit test CA"), _make_ca("rogue CA")
    ca_file = _write_ca(folder, "ca", ca)
    files = {who: _write_pair(folder, who, ca, who) for who in ("scheduler", "worker", "client")}
    rogue_cert, rogue_key = _write_pair(folder, "rogue-client", rogue, "client")

    def tls_args(who):
        cert, key = files[who]
        return ("--tls-ca-file", ca_file, "--tls-cert", cert, "--tls-key", key)

    good = Security(tls_ca_file=ca_file, tls_client_cert=files["client"][0],
                    tls_client_key=files["client"][1], require_encryption=True)
    wrong = Security(tls_ca_file=_write_ca(folder, "rogue-ca", rogue), tls_client_cert=rogue_cert,
                     tls_client_key=rogue_key, require_encryption=True)
    # the right CA but a client certificate the scheduler's CA did not sign
    wrong_cert = Security(tls_ca_file=ca_file, tls_client_cert=rogue_cert,
                          tls_client_key=rogue_key, require_encryption=True)
    with dask_scheduler(folder, args=("--protocol", "tls", *tls_args("scheduler"))) as scheduler, \
            dask_workers(scheduler.address, folder, n=1, args=tls_args("worker"), security=good):
        assert scheduler.address.startswith("tls://127.0.0.1:")
        yield scheduler, good, wrong, wrong_cert


def test_tls_client_with_certificates_fits(tls, store, reference):
    scheduler, good, _, _ = tls
    with connect(scheduler.address, security=good, quiet=True) as client:
        km = KMeans(4, random_state=0, cache=False).fit(store)
        assert_array_equal(km.cluster_centers_, reference.cluster_centers_)
        assert list(client.scheduler_info()["workers"])[0].startswith("tls://127.0.0.1:")


@pytest.mark.parametrize("case", ["tcp_scheme", "no_certificates", "wrong_ca", "wrong_client_cert"])
def test_tls_scheduler_refuses_other_clients_quickly(tls, case):
    scheduler, _, wrong, wrong_cert = tls
    port = scheduler.address.rsplit(":", 1)[1]
    address, security, hint = {
        # plain TCP to the TLS port
        "tcp_scheme": (f"tcp://127.0.0.1:{port}", None, "use its tls:// address with security="),
        "no_certificates": (scheduler.address, None, "but no TLS settings were given"),
        # neither side trusts the other
        "wrong_ca": (scheduler.address, wrong, "The TLS handshake failed"),
        # the right CA, but the scheduler rejects the client's certificate
        "wrong_client_cert": (scheduler.address, wrong_cert, "The TLS handshake failed"),
    }[case]
    start = time.monotonic()
    with pytest.raises(SchedulerConnectionError) as info:
        connect(address, security=security, timeout=2.0, quiet=True)
    assert time.monotonic() - start < 2.0 + 4
    message = str(info.value)
    assert address in message and "could not connect" in message and hint in message
    assert scheduler.proc.poll() is None  # the scheduler is unharmed


# --- failures with a clear message in bounded time ----------------------------------------


# The scheduler reports an old distributed, and the worker has no dmlkit: what a client
# meets when the cluster was installed from another environment.
OLD_DISTRIBUTED = """
import distributed.versions as v
_real = v._version_cached
v._version_cached = lambda pkg: "2024.1.0" if pkg == "distributed" else _real(pkg)
"""
NO_DMLKIT = """
import distributed.versions as v
_real = v._version_cached
v._version_cached = lambda pkg: None if pkg == "dmlkit" else _real(pkg)
"""


@pytest.mark.filterwarnings("ignore::distributed.versions.VersionMismatchWarning")
def test_version_mismatch_is_a_clear_error(tmp_path):
    import distributed

    with dask_scheduler(tmp_path, prelude=OLD_DISTRIBUTED) as scheduler, \
            dask_workers(scheduler.address, tmp_path, n=1, prelude=NO_DMLKIT,
                         args=("--no-nanny",)):  # no nanny: the prelude runs in the worker
        start = time.monotonic()
        with pytest.raises(SchedulerVersionError) as info:
            connect(scheduler.address, timeout=5.0, quiet=True)
        assert time.monotonic() - start < 5.0 + 4
        message = str(info.value)
        assert f"distributed {distributed.__version__} here, 2024.1.0 on the scheduler" in message
        assert f"dmlkit {dmlkit.__version__} here, missing on worker tcp://127.0.0.1:" in message
        assert "check_versions=False" in message
        with connect(scheduler.address, check_versions=False, quiet=True) as client:
            assert client.submit(sum, [1, 2]).result() == 3


@pytest.mark.parametrize("address", ["tcp://192.0.2.1:8786",       # TEST-NET-1: nobody answers
                                     "tcp://no-such-host.invalid:8786"])
def test_unreachable_address_is_a_clear_error_in_bounded_time(address):
    start = time.monotonic()
    with pytest.raises(SchedulerConnectionError) as info:
        connect(address, timeout=1.5)
    assert time.monotonic() - start < 1.5 + 4
    assert address in str(info.value) and "timeout=1.5 s" in str(info.value)


# --- a notebook on a separate-process scheduler -------------------------------------------


@pytest.mark.notebooks
def test_kmeans_notebook_runs_on_a_separate_process_scheduler(remote, tmp_path_factory):
    pytest.importorskip("nbclient")
    env = notebook_env(tmp_path_factory.mktemp("nb-remote"))
    env["DMLKIT_SCHEDULER"] = remote.address
    before = set(psutil.Process().children(recursive=True))
    outputs = execute_notebook(ROOT / "notebooks" / "03_kmeans.ipynb", env)
    printed = "\n".join(outputs)
    assert f"DMLKIT_SCHEDULER: {remote.address}" in printed
    assert f"dmlkit: connected to {remote.address} (2 workers" in printed
    assert "LocalCluster" not in printed.split("dmlkit: connected to", 1)[1].splitlines()[0]
    assert remote.proc.poll() is None
    leftover = [p for p in psutil.Process().children(recursive=True) if p not in before
                and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not leftover, leftover
