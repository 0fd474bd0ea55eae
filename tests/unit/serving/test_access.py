"""The gateway's access rules as plain objects: API keys, the rate limiter's token buckets, and the
model store that decides where a model may load from."""

from __future__ import annotations

import hashlib
import secrets

import pytest

from serving.access import (
    AccessConfigError,
    ApiKeys,
    CaptureRoots,
    ModelStore,
    RateLimiter,
    SourceRefused,
    key_digest,
    load_api_keys,
    parse_api_keys,
    presented_key,
    role_allows,
)


def fresh_key() -> str:
    return secrets.token_urlsafe(24)


# -- API keys ---------------------------------------------------------------------------------------


def test_keys_from_a_file_plain_or_hashed_and_from_the_environment(tmp_path):
    airflow, notebook, single = fresh_key(), fresh_key(), fresh_key()
    keys_file = tmp_path / "keys"
    digest = hashlib.sha256(notebook.encode()).hexdigest()
    keys_file.write_text(f"# clients\nairflow {airflow}\n\nnotebook sha256:{digest}  # hashed\n")
    keys_file.chmod(0o600)
    keys = load_api_keys(str(keys_file), {"LLMOPS_GATEWAY_API_KEY": single})
    assert keys.clients == ["airflow", "notebook", "default"]
    assert keys.identify(airflow) == "airflow"
    assert keys.identify(notebook) == "notebook"
    assert keys.identify(single) == "default"
    assert keys.identify(airflow + "x") is None
    assert keys.identify("") is None and keys.identify(None) is None
    assert len(load_api_keys(None, {})) == 0
    assert load_api_keys(None, {"LLMOPS_GATEWAY_API_KEYS_FILE": str(keys_file)}).clients == ["airflow", "notebook"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("airflow", "expected '<client-name> <key>'"),
        ("air flow key-that-is-long-enough", "expected"),
        ("-bad-name key-that-is-long-enough", "client name '-bad-name'"),
        ("airflow short", "has 5 characters; at least 16"),
        ("airflow sha256:abc", "has 10 characters"),
    ],
)
def test_a_bad_keys_line_is_named_without_its_key(line, message):
    with pytest.raises(AccessConfigError, match="keys:1") as caught:
        parse_api_keys([line], "keys")
    assert message in str(caught.value)
    if len(line.split()) > 1:
        assert line.split()[-1] not in str(caught.value)  # never the key itself


def test_duplicate_clients_or_keys_are_refused(tmp_path):
    key = fresh_key()
    with pytest.raises(AccessConfigError, match="keys:2: client a appears twice"):
        parse_api_keys([f"a {key}", f"a {fresh_key()}"], "keys")
    with pytest.raises(AccessConfigError, match="keys:2: client b has the same key as another client"):
        parse_api_keys([f"a {key}", f"b {key}"], "keys")
    with pytest.raises(AccessConfigError, match="API keys file .*missing"):
        load_api_keys(str(tmp_path / "missing"), {})


def test_the_key_comes_from_x_api_key_or_a_bearer_token_never_from_sigv4():
    key = fresh_key()
    assert presented_key([(b"x-api-key", key.encode())]) == key
    assert presented_key([(b"authorization", f"Bearer {key}".encode())]) == key
    assert presented_key([(b"authorization", f"bearer  {key} ".encode())]) == key
    sigv4 = b"AWS4-HMAC-SHA256 Credential=x/20260101/us-east-1/sagemaker/aws4_request, Signature=ab"
    assert presented_key([(b"authorization", sigv4)]) is None
    assert presented_key([(b"authorization", sigv4), (b"x-api-key", key.encode())]) == key
    assert presented_key([]) is None


def test_identify_checks_every_key():
    keys = ApiKeys({f"c{i}": hashlib.sha256(f"key-{i}".encode()).digest() for i in range(5)})
    assert [keys.identify(f"key-{i}") for i in range(5)] == [f"c{i}" for i in range(5)]


# -- rate limits ----------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_bucket_allows_its_burst_then_its_rate_per_client():
    clock = Clock()
    limiter = RateLimiter(rate=2, burst=3, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.acquire("a") == pytest.approx(0.5)
    assert limiter.acquire("b") == 0  # another client has its own bucket
    clock.now += 0.5
    assert limiter.acquire("a") == 0
    assert limiter.acquire("a") > 0
    clock.now += 10  # a long pause refills up to the burst, not beyond
    assert [limiter.acquire("a") for _ in range(4)][-1] > 0


def test_many_clients_cannot_grow_the_table_without_bound():
    clock = Clock()
    limiter = RateLimiter(rate=10, burst=1, max_clients=100, clock=clock)
    for number in range(1000):
        limiter.acquire(f"client-{number}")
        clock.now += 0.2  # each bucket is full again 0.1 s after its request
    assert len(limiter._buckets) <= 100


def test_a_flood_of_new_clients_within_one_refill_keeps_the_table_bounded_and_the_recent_ones_limited():
    clock = Clock()
    limiter = RateLimiter(rate=0.001, burst=1, max_clients=100, clock=clock)  # refills after 1000 s
    assert limiter.acquire("steady") == 0
    for number in range(10_000):
        limiter.acquire(f"flood-{number}")
        if number % 50 == 0:
            assert limiter.acquire("steady") > 0  # seen often: never forgotten, still limited
    assert len(limiter._buckets) <= 100
    assert limiter.acquire("flood-9999") > 0  # a recent client keeps its empty bucket


def test_bad_rates_are_refused():
    with pytest.raises(ValueError, match="above 0"):
        RateLimiter(0)
    with pytest.raises(ValueError, match="at least 1 request"):
        RateLimiter(5, burst=0.5)


# -- the model store --------------------------------------------------------------------------------


@pytest.fixture
def store_root(tmp_path):
    root = tmp_path / "store"
    (root / "training-jobs" / "job" / "output").mkdir(parents=True)
    (root / "training-jobs" / "job" / "output" / "model.tar.gz").write_bytes(b"tarball")
    (root / "adapter").mkdir()
    (root / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "model.tar.gz").write_bytes(b"elsewhere")
    return root


def test_sources_inside_the_store_are_accepted(store_root):
    store = ModelStore([str(store_root), "s3://models-bucket/llmops/store"])
    tarball = store_root / "training-jobs" / "job" / "output" / "model.tar.gz"
    for url in (str(tarball), tarball.as_uri(), str(store_root / "adapter"), str(store_root / "a" / ".." / "adapter")):
        store.check_model_data("m", url)
    assert store.local_source("m", tarball.as_uri()) == tarball.resolve()
    store.check_model_data("m", "s3://models-bucket/llmops/store/training-jobs/job/output/model.tar.gz")
    (store_root / "latest").symlink_to(store_root / "adapter")  # a link that stays inside is fine
    store.check_model_data("m", str(store_root / "latest"))


@pytest.mark.parametrize(
    ("make_url", "why"),
    [
        (lambda root: str(root.parent / "outside" / "model.tar.gz"), "is outside the store"),
        (lambda root: f"{root}/../outside/model.tar.gz", "is outside the store"),
        (lambda root: f"file://{root}/adapter/../../outside/model.tar.gz", "is outside the store"),
        (lambda root: f"{root}-evil/model.tar.gz", "is outside the store"),  # a sibling sharing the prefix
        (lambda root: "http://models.example/model.tar.gz", "has the scheme http://"),
        (lambda root: "s3://other-bucket/llmops/store/m.tar.gz", "is outside the store"),
        (lambda root: "s3://models-bucket/llmops/store-evil/m.tar.gz", "is outside the store"),
        (lambda root: "s3://models-bucket/llmops/store/../secrets/m.tar.gz", "is not an s3://bucket/key URI"),
    ],
    ids=[
        "absolute-path",
        "dot-dot",
        "file-uri-dot-dot",
        "sibling-with-the-same-prefix",
        "http",
        "other-bucket",
        "s3-sibling-prefix",
        "s3-dot-dot",
    ],
)
def test_sources_outside_the_store_are_refused_naming_the_url_and_the_roots(store_root, make_url, why):
    store = ModelStore([str(store_root), "s3://models-bucket/llmops/store"])
    url = make_url(store_root)
    with pytest.raises(SourceRefused) as caught:
        store.check_model_data("m", url)
    message = str(caught.value)
    assert url in message and why in message
    assert str(store_root.resolve()) in message and "s3://models-bucket/llmops/store" in message


def test_links_out_of_the_store_are_refused(store_root):
    store = ModelStore([str(store_root)])
    outside = store_root.parent / "outside"
    (store_root / "escape.tar.gz").symlink_to(outside / "model.tar.gz")
    with pytest.raises(SourceRefused, match="resolves to .*outside/model.tar.gz, which is outside the store"):
        store.check_model_data("m", str(store_root / "escape.tar.gz"))
    (store_root / "adapter" / "adapter_model.safetensors").symlink_to(outside / "model.tar.gz")
    with pytest.raises(SourceRefused, match="holds .*adapter_model.safetensors, a link to .* outside the store"):
        store.check_model_data("m", str(store_root / "adapter"))


def test_container_urls_stay_on_loopback_unless_allowed():
    store = ModelStore(["/srv/store"])
    for url in ("http://127.0.0.1:8080", "http://localhost:9000/", "http://[::1]:8080", "http://127.8.9.10:1"):
        store.check_container_url("m", url)
    for url in ("http://model:8080", "https://models.example", "http://10.0.0.5:8080", "http://0.0.0.0:80"):
        with pytest.raises(SourceRefused, match="--allow-remote-containers"):
            store.check_container_url("m", url)
    ModelStore(["/srv/store"], allow_remote_containers=True).check_container_url("m", "http://model:8080")


def test_an_environment_may_not_change_what_code_a_model_server_runs():
    ModelStore.check_environment("m", {"LLMOPS_MAX_BATCH_SIZE": "4", "LLMOPS_SYSTEM_PROMPT": "Be brief."})
    with pytest.raises(SourceRefused, match="LD_PRELOAD, PYTHONPATH, SM_MODEL_DIR"):
        ModelStore.check_environment("m", {"PYTHONPATH": "/tmp", "LD_PRELOAD": "/x.so", "SM_MODEL_DIR": "/etc"})
    # Where base models may come from, and the limits a model server loads under, are the operator's.
    for name in ("LLMOPS_BASE_MODEL", "LLMOPS_BASE_MODEL_ROOTS", "LLMOPS_MAX_MODEL_BYTES", "LLMOPS_MAX_NEW_TOKENS"):
        with pytest.raises(SourceRefused, match=name):
            ModelStore.check_environment("m", {name: "/"})
    ModelStore.check_environment("m", {"LLMOPS_BASE_MODEL_NAME": "smollm2-135m-instruct"})


def test_bad_roots_are_refused():
    with pytest.raises(AccessConfigError, match="at least one"):
        ModelStore([])
    with pytest.raises(AccessConfigError, match="http://x"):
        ModelStore(["http://x"])
    with pytest.raises(AccessConfigError, match="not an s3://bucket/prefix"):
        ModelStore(["s3:///prefix"])


def test_a_key_may_hold_a_hash_sign_and_comments_follow_a_space():
    keys = parse_api_keys(
        ["ops abcdefghijklmnop#qrstuvwx", "# a comment line", "ci 0123456789abcdefXYZ  # rotated"], "f"
    )
    assert {name: key.digest for name, key in keys.items()} == {
        "ops": key_digest("abcdefghijklmnop#qrstuvwx"),
        "ci": key_digest("0123456789abcdefXYZ"),
    }


# -- roles --------------------------------------------------------------------------------------


def test_a_key_line_names_its_role_and_a_line_without_one_only_invokes(tmp_path):
    admin, ops, caller, single = fresh_key(), fresh_key(), fresh_key(), fresh_key()
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"airflow {admin} admin\nops sha256:{hashlib.sha256(ops.encode()).hexdigest()} operate\n")
    keys_file.write_text(keys_file.read_text() + f"notebook {caller}\n")
    keys_file.chmod(0o600)
    keys = load_api_keys(str(keys_file), {"LLMOPS_GATEWAY_API_KEY": single})
    assert keys.roles == {"airflow": "admin", "ops": "operate", "notebook": "invoke", "default": "admin"}
    assert keys.role(keys.identify(caller)) == "invoke"
    invoking = load_api_keys(None, {"LLMOPS_GATEWAY_API_KEY": single, "LLMOPS_GATEWAY_API_KEY_ROLE": "invoke"})
    assert invoking.roles == {"default": "invoke"}
    with pytest.raises(AccessConfigError, match="LLMOPS_GATEWAY_API_KEY_ROLE: 'root' is not one of invoke"):
        load_api_keys(None, {"LLMOPS_GATEWAY_API_KEY": single, "LLMOPS_GATEWAY_API_KEY_ROLE": "root"})


def test_a_bad_role_is_named_with_its_line_and_never_the_key():
    key = fresh_key()
    with pytest.raises(
        AccessConfigError, match="keys:2: .* the third field is not one of invoke, operate, admin"
    ) as caught:
        parse_api_keys([f"a {fresh_key()}", f"b {key} superuser"], "keys")
    assert key not in str(caught.value) and "superuser" not in str(caught.value)
    with pytest.raises(AccessConfigError, match="keys:1: expected .* then optionally a role"):
        parse_api_keys([f"a {key} admin extra"], "keys")


def test_a_role_holds_the_ones_below_it():
    assert [role_allows("invoke", needed) for needed in ("invoke", "operate", "admin")] == [True, False, False]
    assert [role_allows("operate", needed) for needed in ("invoke", "operate", "admin")] == [True, True, False]
    assert [role_allows("admin", needed) for needed in ("invoke", "operate", "admin")] == [True, True, True]


# -- container URLs: a host and a port, nothing else ---------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:5000/api/2.0/mlflow/experiments/create", "has a path"),
        ("http://127.0.0.1:5000?x=1", "has a query"),
        ("http://127.0.0.1:5000/#frag", "has a fragment"),
        ("http://user:pw@127.0.0.1:5000", "has credentials"),
        ("ftp://127.0.0.1:21", "needs http:// or https://"),
        ("unix:///var/run/docker.sock", "needs http:// or https://"),
        ("http://127.0.0.1:notaport", "is not a URL"),
    ],
)
def test_a_container_url_with_more_than_a_host_and_port_is_refused(url, why):
    for store in (ModelStore(["/srv/store"]), ModelStore(["/srv/store"], allow_remote_containers=True)):
        with pytest.raises(SourceRefused, match=why):
            store.check_container_url("m", url)


# -- capture roots ------------------------------------------------------------------------------


def test_capture_stays_inside_its_roots_after_dots_and_links_are_resolved(tmp_path):
    root = tmp_path / "capture"
    root.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    roots = CaptureRoots([str(root)])
    assert roots.check("cfg", str(root / "ep")) == root / "ep"
    assert roots.check("cfg", (root / "a" / "b").as_uri()) == root / "a" / "b"
    for destination in (str(root / ".." / "elsewhere"), str(root / "escape" / "x"), "/etc", str(outside)):
        with pytest.raises(SourceRefused, match="is outside the capture roots") as caught:
            roots.check("cfg", destination)
        assert "endpoint config cfg" in str(caught.value)
    for destination, why in (("s3://bucket/capture", "folder or a file:// URI"), ("relative/dir", "not an absolute")):
        with pytest.raises(SourceRefused, match=why):
            roots.check("cfg", destination)
    with pytest.raises(AccessConfigError, match="no capture root"):
        CaptureRoots([])
