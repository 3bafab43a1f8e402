#!/usr/bin/env python3
"""End-to-end check of stacyvmd with the unmodified StacyVM Python SDK.

Runs against a live daemon whose `process` provider is enabled:

    STACYVMD_URL=http://127.0.0.1:7423 python e2e.py

Environment:
    STACYVMD_URL           the daemon's base URL (required)
    STACYVMD_API_KEY       API key, when the daemon has keys configured; the
                           script then also checks that no key gives 401
    STACYVMD_EXEC_TIMEOUT  the daemon's providers.process.exec_timeout in
                           seconds, when it is short (a few seconds): enables
                           the streamed-timeout check (exec_stream cannot send
                           a timeout of its own)

Needs `stacyvm==0.1.1` (and so httpx). Every check is an assert with a
message; one line is printed per passed step; any failure exits non-zero.
tests/sdk_e2e.rs runs it in `cargo test`; docs/sdk-compatibility.md explains
what it relies on.
"""

import asyncio
import json
import os
import re
import sys
import time
import traceback
from datetime import datetime, timedelta, timezone

import httpx
import stacyvm
from stacyvm import AsyncClient, Client, SandboxNotFound, StacyVMError
from stacyvm.models import Template
from stacyvm.streaming import StreamChunk  # not re-exported by `stacyvm`

URL = os.environ["STACYVMD_URL"].rstrip("/")
API_KEY = os.environ.get("STACYVMD_API_KEY") or None
EXEC_TIMEOUT = os.environ.get("STACYVMD_EXEC_TIMEOUT")
OWNER = "sdk-e2e"
# The SDK sends image "alpine:latest" unless told otherwise; the process
# provider has only the images its config names, and "host" always.
SPAWN = dict(provider="process", image="host")

# A Go-style duration as stacyvmd writes it: "5ms", "1s", "1m30s".
DURATION = re.compile(r"^(\d+ms|(\d+h)?(\d+m)?(\d+s)?)$")
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")

spawned = []  # every sandbox id this script created, for the final cleanup


STARTED = time.monotonic()


def step(name):
    print(f"ok   {time.monotonic() - STARTED:5.1f}s  {name}", flush=True)


def parse_time(text):
    assert isinstance(text, str) and RFC3339.match(text), f"not an RFC 3339 UTC time: {text!r}"
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def expect_error(call, kind, code, what, contains=None):
    """Runs `call`, which must raise `kind` with `code`; returns the error."""
    try:
        result = call()
    except kind as e:
        assert e.code == code, f"{what}: expected code {code!r}, got {e.code!r} ({e})"
        if contains is not None:
            assert contains in str(e), f"{what}: {contains!r} not in the message {str(e)!r}"
        return e
    except Exception as e:  # noqa: BLE001 - reported with its type
        raise AssertionError(f"{what}: expected {kind.__name__}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"{what}: expected {kind.__name__} ({code}), got a result: {result!r}")


def collect(chunks):
    """Splits a finished stream into (stdout, stderr, exit chunks, all)."""
    chunks = list(chunks)
    for ch in chunks:
        assert isinstance(ch, StreamChunk), f"not a StreamChunk: {ch!r}"
        assert ch.stream in ("stdout", "stderr", "exit"), f"unknown stream in {ch!r}"
    out = "".join(ch.data for ch in chunks if ch.stream == "stdout")
    err = "".join(ch.data for ch in chunks if ch.stream == "stderr")
    exits = [ch for ch in chunks if ch.stream == "exit"]
    assert len(exits) == 1, f"expected one exit chunk, got {exits!r} in {chunks!r}"
    assert chunks[-1] is exits[0], f"the exit chunk is not the last one: {chunks!r}"
    return out, err, exits[0], chunks


def mode_of(info):
    mode = info.get("mode")
    assert isinstance(mode, str) and re.match(r"^[0-7]{4}$", mode), f"mode is not a 4-digit octal string: {info!r}"
    return mode


def check_file_info(info, path, size, is_dir):
    """The object list_files items and stat_file share."""
    assert isinstance(info, dict), f"file info is not an object: {info!r}"
    for key in ("name", "path", "size", "mode", "is_dir", "is_symlink", "mod_time"):
        assert key in info, f"file info without {key!r}: {info!r}"
    assert info["path"] == path, f"path: expected {path!r} in {info!r}"
    assert info["name"] == path.rsplit("/", 1)[-1], f"name is not the basename of {path!r}: {info!r}"
    if size is not None:
        assert info["size"] == size, f"size: expected {size} in {info!r}"
    assert info["is_dir"] is is_dir, f"is_dir: expected {is_dir} in {info!r}"
    assert info["is_symlink"] is False, f"is_symlink: expected False in {info!r}"
    mode_of(info)
    parse_time(info["mod_time"])


# ---------------------------------------------------------------------------
# Sync client


def sync_suite():
    c = Client(URL, api_key=API_KEY, user_id=OWNER, timeout=30.0)
    with c:
        health = c.health()
        assert health.get("status") == "ok", f"health: {health!r}"
        names = [p.get("name") for p in c.providers()]
        assert "process" in names, f"the process provider is not listed: {names!r}"
        step("health and providers")

        d = c.admission(ttl="10m", **SPAWN)
        assert (d.allowed, d.queueable, d.reason) == (True, False, ""), f"admission: {d!r}"
        assert d.max_sandboxes > 0 and d.max_ttl, f"admission limits: {d!r}"
        step(f"admission -> allowed, {d.active_sandboxes} of {d.max_sandboxes} sandboxes")

        q = c.quota_summary()
        assert (q.total, q.with_max_sandboxes, q.with_max_ttl, q.with_max_exec_timeout) == (0, 0, 0, 0), f"quota_summary: {q!r}"
        step("quota_summary -> no policies")

        if API_KEY:
            with Client(URL, timeout=30.0) as anonymous:
                expect_error(anonymous.list, StacyVMError, "UNAUTHORIZED", "list without an API key")
            step("no API key -> StacyVMError UNAUTHORIZED")

        # The SDK's default image is "alpine:latest", which the process
        # provider does not have unless configured: 400 naming the images.
        e = expect_error(lambda: c.spawn(provider="process"), StacyVMError, "BAD_REQUEST",
                         "spawn with the SDK's default image", contains="alpine:latest")
        assert "host" in str(e), f"the refusal should name the configured images: {e}"
        step("spawn with the default image alpine:latest -> 400 naming the images")

        sb = c.spawn(ttl="10m", metadata={"suite": "sdk-e2e"}, **SPAWN)
        spawned.append(sb.id)
        assert re.match(r"^sb-[0-9a-f]{16}$", sb.id), f"sandbox id: {sb.id!r}"
        assert (sb.state, sb.provider, sb.image) == ("running", "process", "host"), f"spawned: {sb._info!r}"
        assert sb._info.get("owner_id") == OWNER, f"X-User-ID should set owner_id: {sb._info!r}"
        created = parse_time(sb._info["created_at"])
        expires = parse_time(sb._info["expires_at"])
        assert expires - created == timedelta(minutes=10), f"ttl 10m: {sb._info!r}"
        step(f"spawn provider=process image=host -> {sb.id}")

        infos = [i for i in c.list() if i.id == sb.id]
        assert len(infos) == 1, f"list should hold {sb.id} once: {c.list()!r}"
        info = infos[0]
        assert (info.state, info.provider, info.image) == ("running", "process", "host"), f"list item: {info!r}"
        assert info.metadata == {"suite": "sdk-e2e"}, f"list item metadata: {info!r}"
        assert info.expires_at == sb._info["expires_at"], f"list item expires_at: {info!r}"
        step("list")

        got = c.get(sb.id)
        assert got.id == sb.id and got.state == "running", f"get: {got._info!r}"
        assert got._info == sb._info, f"get differs from spawn: {got._info!r} vs {sb._info!r}"
        sb.refresh()
        assert sb.state == "running", f"refresh: {sb._info!r}"
        step("get and refresh")

        exec_suite(sb)
        stream_suite(sb)
        files_suite(sb)

        before = parse_time(sb._info["expires_at"])
        sb.extend_ttl("1h")  # POST /extend, then the SDK re-GETs the sandbox
        after = parse_time(sb._info["expires_at"])
        now = datetime.now(timezone.utc)
        assert after > before, f"extend_ttl did not move expires_at: {before} -> {after}"
        assert abs((after - now) - timedelta(hours=1)) < timedelta(minutes=1), \
            f"expires_at should be about now + 1h: {after} (now {now})"
        assert c.get(sb.id)._info["expires_at"] == sb._info["expires_at"], "get after extend"
        step("extend_ttl 1h")

        sb.destroy()
        assert sb.id not in [i.id for i in c.list()], "a destroyed sandbox is still listed"
        step("destroy")

        missing_suite(c, sb)

        with c.spawn(**SPAWN) as scoped:
            spawned.append(scoped.id)
            assert scoped.exec("echo scoped").stdout == "scoped\n", "exec in a `with` sandbox"
        expect_error(lambda: c.get(scoped.id), SandboxNotFound, "NOT_FOUND", "get after `with` ended")
        step("`with client.spawn(...)` destroys on exit")

        templates_suite(c)


def templates_suite(c):
    name = f"sdk-e2e-{os.getpid()}"
    saved = c.templates.save(Template(name=name, image="host", memory_mb=256, ttl="20m",
                                      provider="process", metadata={"suite": "sdk-e2e"}))
    assert (saved.name, saved.image, saved.memory_mb, saved.ttl) == (name, "host", 256, "20m"), f"saved: {saved!r}"
    assert name in [t.name for t in c.templates.list()], "templates.list misses the saved one"
    assert c.templates.get(name) == saved, f"templates.get: {c.templates.get(name)!r}"
    sb = c.spawn_template(name)
    spawned.append(sb.id)
    info = sb._info
    assert (info["image"], info["memory_mb"], info.get("metadata")) == ("host", 256, {"suite": "sdk-e2e"}), f"spawned: {info!r}"
    assert parse_time(info["expires_at"]) - parse_time(info["created_at"]) == timedelta(minutes=20), f"ttl: {info!r}"
    assert sb.exec("echo from-template").stdout == "from-template\n", "exec in a template's sandbox"
    sb.destroy()
    c.templates.delete(name)
    # The SDK raises SandboxNotFound (code NOT_FOUND) for every 404; the
    # message is the daemon's, naming the template (TEMPLATE_NOT_FOUND).
    expect_error(lambda: c.templates.get(name), SandboxNotFound, "NOT_FOUND", "get a deleted template",
                 contains="template")
    expect_error(lambda: c.spawn_template(name), SandboxNotFound, "NOT_FOUND", "spawn a deleted template",
                 contains="template")
    step("templates: save, list, get, spawn_template (image, memory, ttl, metadata), delete, then 404")


def exec_suite(sb):
    r = sb.exec("echo hi; echo err >&2; exit 3")  # shell mode: no "mode" key sent
    assert (r.exit_code, r.stdout, r.stderr) == (3, "hi\n", "err\n"), f"shell exec: {r!r}"
    assert isinstance(r.duration, str) and DURATION.match(r.duration), f"duration is not a duration string: {r!r}"
    step(f"exec shell mode: exit 3, stdout, stderr, duration {r.duration!r}")

    r = sb.exec("hostname; pwd; id -u")
    lines = r.stdout.splitlines()
    assert r.exit_code == 0 and len(lines) == 3, f"hostname/pwd/id: {r!r}"
    assert lines[0] == sb.id, f"hostname should be the sandbox id: {r!r}"
    assert lines[1] == "/workspace", f"default workdir should be /workspace: {r!r}"
    step("exec: hostname is the sandbox id, default workdir /workspace")

    # Shell mode appends args to the command, each shell-quoted (the SDK
    # README's exec("npm test", args=["--coverage"])).
    r = sb.exec("printf '%s|'", args=["a b", "it's", "$HOME", "*"])
    assert (r.exit_code, r.stdout) == (0, "a b|it's|$HOME|*|"), f"shell mode args: {r!r}"
    step("exec shell mode with args (appended, quoted)")

    r = sb.exec("echo", args=["a b", "c"], mode="argv")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "a b c\n", ""), f"argv exec: {r!r}"
    r = sb.exec("echo", args=["$HOME", "*"], mode="argv")
    assert r.stdout == "$HOME *\n", f"argv mode must not expand: {r!r}"
    r = sb.exec("sh", args=["-c", 'echo "$X"; pwd; exit 7'], mode="argv",
                env={"X": "x y"}, workdir="/tmp", timeout="5s")
    assert (r.exit_code, r.stdout) == (7, "x y\n/tmp\n"), f"argv with env/workdir/timeout: {r!r}"
    step("exec argv mode with args, env, workdir, timeout")

    r = sb.exec('echo "$X:$Y"', env={"X": "1", "Y": "é"}, workdir="/tmp")
    assert r.stdout == "1:é\n", f"shell with env: {r!r}"
    step("exec shell mode with env and workdir")

    t0 = time.monotonic()
    e = expect_error(lambda: sb.exec("sleep 30", timeout="1s"), StacyVMError, "TIMEOUT", "exec past its timeout")
    took = time.monotonic() - t0
    assert took < 10, f"a 1s timeout took {took:.1f}s"
    assert "timed out" in str(e), f"timeout message: {e}"
    assert sb.exec("echo alive").stdout == "alive\n", "the sandbox should be usable after a timeout"
    step(f"exec timeout 1s -> StacyVMError TIMEOUT (408) in {took:.1f}s")

    expect_error(lambda: sb.exec("true", mode="ARGV"), StacyVMError, "BAD_REQUEST", "unknown mode", contains="mode")
    r = sb.exec("no-such-command-here")
    assert r.exit_code == 127, f"a missing command is exit 127, not an error: {r!r}"
    r = sb.exec("kill -9 $$")
    assert r.exit_code == 137, f"killed by SIGKILL is 128+9: {r!r}"
    step("exec: bad mode -> 400; exit 127 and 137 are results, not errors")


def stream_suite(sb):
    out, err, exit_chunk, _ = collect(sb.exec_stream("echo a; echo b >&2; exit 3"))
    assert (out, err) == ("a\n", "b\n"), f"stream output: {out!r} {err!r}"
    assert exit_chunk == StreamChunk("exit", "3"), f"exit chunk: {exit_chunk!r}"
    step("exec_stream shell: stdout and stderr chunks, then exit chunk data '3'")

    out, err, exit_chunk, _ = collect(sb.exec_stream(
        "sh", args=["-c", 'echo "$Y"; pwd'], mode="argv", env={"Y": "z"}, workdir="/tmp"))
    assert (out, err, exit_chunk.data) == ("z\n/tmp\n", "", "0"), f"argv stream: {out!r} {err!r} {exit_chunk!r}"
    step("exec_stream argv mode with args, env, workdir")

    # Chunks arrive as they are produced, not all at the end.
    arrivals = []
    for ch in sb.exec_stream("for i in 1 2 3; do echo $i; sleep 0.3; done"):
        arrivals.append((time.monotonic(), ch))
    out, _, exit_chunk, _ = collect(ch for _, ch in arrivals)
    assert (out, exit_chunk.data) == ("1\n2\n3\n", "0"), f"stream: {arrivals!r}"
    first = next(t for t, ch in arrivals if ch.stream == "stdout")
    spread = arrivals[-1][0] - first
    assert spread >= 0.3, f"chunks came together ({spread:.2f}s apart): not streamed"
    step(f"exec_stream is incremental (first to last chunk {spread:.2f}s)")

    if EXEC_TIMEOUT:
        limit = float(EXEC_TIMEOUT)
        t0 = time.monotonic()
        out, err, exit_chunk, _ = collect(sb.exec_stream(f"echo started; sleep {limit * 10:g}"))
        took = time.monotonic() - t0
        assert out == "started\n", f"output before the timeout: {out!r}"
        assert exit_chunk.data == "124", f"a timed-out stream ends with exit 124: {exit_chunk!r}"
        assert "timed out" in err, f"a stderr chunk should say it timed out: {err!r}"
        assert took < limit + 10, f"stream timeout of {limit}s took {took:.1f}s"
        # The SDK keeps only stream and data; the exit line also says
        # timed_out (read here with httpx, which the SDK is built on).
        headers = {"X-API-Key": API_KEY} if API_KEY else {}
        with httpx.Client(base_url=URL, headers=headers, timeout=30.0) as raw:
            resp = raw.post(f"/api/v1/sandboxes/{sb.id}/exec",
                            json={"command": f"sleep {limit * 10:g}", "stream": True})
            assert resp.status_code == 200, f"raw stream status: {resp.status_code} {resp.text}"
            lines = [line for line in resp.text.splitlines() if line.strip()]
            last = json.loads(lines[-1])
            assert last.get("stream") == "exit" and last.get("data") == "124", f"raw exit line: {lines!r}"
            assert last.get("timed_out") is True, f"raw exit line should say timed_out: {lines!r}"
        step(f"exec_stream past the daemon's exec_timeout ({limit:g}s): exit chunk '124', timed_out true")


def files_suite(sb):
    text = "héllo wörld\n"
    size = len(text.encode())
    sb.write_file("/tmp/a b.txt", text, mode="644")
    got = sb.read_file("/tmp/a b.txt")
    assert got == text, f"read_file: {got!r}"
    step("write_file and read_file (UTF-8 text, a space in the name)")

    sb.write_file("notes/rel.txt", "relative\n")  # relative: under /workspace, parents made
    assert sb.read_file("/workspace/notes/rel.txt") == "relative\n", "relative path lands in /workspace"
    step("write_file with a relative path lands in /workspace")

    entries = sb.list_files("/tmp")
    assert isinstance(entries, list), f"list_files: {entries!r}"
    mine = [e for e in entries if e.get("path") == "/tmp/a b.txt"]
    assert len(mine) == 1, f"list_files /tmp should hold the file once: {entries!r}"
    check_file_info(mine[0], "/tmp/a b.txt", size, False)
    assert mine[0]["mode"] == "0644", f"mode 644: {mine[0]!r}"
    root = {e["path"]: e for e in sb.list_files()}  # the SDK's default path is "/"
    for d in ("/tmp", "/workspace"):
        assert d in root, f"list_files() (path /) should show {d}: {sorted(root)}"
        check_file_info(root[d], d, None, True)
    step("list_files /tmp and the SDK default /")

    st = sb.stat_file("/tmp/a b.txt")
    check_file_info(st, "/tmp/a b.txt", size, False)
    assert st == mine[0], f"stat and list disagree: {st!r} vs {mine[0]!r}"
    check_file_info(sb.stat_file("/workspace/notes"), "/workspace/notes", None, True)
    step("stat_file of a file and a directory")

    sb.exec("mkdir -p /tmp/tree/x/y && touch /tmp/tree/a.py /tmp/tree/x/b.py /tmp/tree/x/y/c.py /tmp/tree/x/y/d.txt")
    assert sb.glob_files("/tmp/*.txt") == ["/tmp/a b.txt"], f"glob /tmp/*.txt: {sb.glob_files('/tmp/*.txt')!r}"
    deep = sb.glob_files("/tmp/tree/**/*.py")
    assert sorted(deep) == ["/tmp/tree/a.py", "/tmp/tree/x/b.py", "/tmp/tree/x/y/c.py"], f"glob with **: {deep!r}"
    assert sb.glob_files("/tmp/*.nothing") == [], "a glob with no match is []"
    step("glob_files with *, ** and no match")

    sb.move_file("/tmp/a b.txt", "/tmp/moved.txt")
    assert sb.read_file("/tmp/moved.txt") == text, "read after move"
    expect_error(lambda: sb.read_file("/tmp/a b.txt"), SandboxNotFound, "NOT_FOUND", "read of the moved-away path")
    step("move_file")

    sb.chmod_file("/tmp/moved.txt", "755")
    assert sb.stat_file("/tmp/moved.txt")["mode"] == "0755", "stat after chmod 755"
    assert sb.exec("stat -c %a /tmp/moved.txt").stdout == "755\n", "the sandbox sees mode 755"
    sb.chmod_file("/tmp/moved.txt", "0600")
    assert sb.stat_file("/tmp/moved.txt")["mode"] == "0600", "stat after chmod 0600"
    step("chmod_file 755 and 0600")

    sb.delete_file("/tmp/moved.txt")
    expect_error(lambda: sb.stat_file("/tmp/moved.txt"), SandboxNotFound, "NOT_FOUND", "stat after delete")
    expect_error(lambda: sb.delete_file("/tmp/tree"), StacyVMError, "BAD_REQUEST", "non-recursive delete of a non-empty dir")
    assert sb.stat_file("/tmp/tree")["is_dir"] is True, "a refused delete leaves the directory"
    sb.delete_file("/tmp/tree", recursive=True)
    expect_error(lambda: sb.stat_file("/tmp/tree"), SandboxNotFound, "NOT_FOUND", "stat after recursive delete")
    assert sb.exec("test -e /tmp/tree").exit_code == 1, "the tree is gone inside the sandbox too"
    step("delete_file of a file, and of a directory (refused, then recursive)")

    expect_error(lambda: sb.read_file("/tmp/../etc/passwd"), StacyVMError, "BAD_REQUEST", "a path with ..")
    expect_error(lambda: sb.write_file("/etc/e2e", "x"), StacyVMError, "BAD_REQUEST", "write outside /workspace and /tmp")
    expect_error(lambda: sb.list_files("/tmp/none"), SandboxNotFound, "NOT_FOUND", "list of a missing directory")
    expect_error(lambda: sb.write_file("/tmp/m", "x", mode="9"), StacyVMError, "BAD_REQUEST", "a non-octal mode")
    step("file errors: .. -> 400, read-only root -> 400, missing -> SandboxNotFound NOT_FOUND, bad mode -> 400")


def missing_suite(c, sb):
    # A missing sandbox is 404; the SDK maps every 404 to SandboxNotFound
    # with code "NOT_FOUND" (its sandbox_id attribute holds the server's
    # message, not the id).
    e = expect_error(lambda: c.get(sb.id), SandboxNotFound, "NOT_FOUND", "get of a destroyed sandbox")
    assert sb.id in str(e), f"the message should name the sandbox: {e}"
    expect_error(lambda: sb.exec("true"), SandboxNotFound, "NOT_FOUND", "exec in a destroyed sandbox")
    expect_error(sb.destroy, SandboxNotFound, "NOT_FOUND", "second destroy")
    expect_error(lambda: sb.read_file("/tmp/x"), SandboxNotFound, "NOT_FOUND", "read_file in a destroyed sandbox")
    expect_error(lambda: c.get("sb-0000000000000000"), SandboxNotFound, "NOT_FOUND", "get of an unknown id")
    step("missing sandbox: get, exec, destroy twice, read_file -> SandboxNotFound NOT_FOUND")

    # SDK bug (stacyvm 0.1.1, sandbox.py exec_stream + exceptions.py:47):
    # exec_stream calls handle_response on a streaming response before
    # reading its body, so on the 404 the server sends, building the error
    # message touches resp.text and httpx raises ResponseNotRead instead of
    # SandboxNotFound. Nothing a server can send avoids it.
    try:
        chunks = list(sb.exec_stream("true"))
    except httpx.ResponseNotRead:
        pass
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"exec_stream on a missing sandbox: expected httpx.ResponseNotRead (SDK bug), "
                             f"got {type(e).__name__}: {e}") from e
    else:
        raise AssertionError(f"exec_stream on a missing sandbox should raise, got {chunks!r}")
    step("missing sandbox: exec_stream raises httpx.ResponseNotRead (SDK bug)")


# ---------------------------------------------------------------------------
# Async client


async def async_suite():
    async with AsyncClient(URL, api_key=API_KEY, user_id=OWNER, timeout=30.0) as c:
        sb = await c.spawn(**SPAWN)
        spawned.append(sb.id)
        assert sb.state == "running", f"async spawn: {sb._info!r}"
        assert sb.id in [i.id for i in await c.list()], "async list"
        assert (await c.get(sb.id)).id == sb.id, "async get"
        step(f"async spawn, list, get -> {sb.id}")

        r = await sb.exec("echo hi; exit 2")
        assert (r.exit_code, r.stdout) == (2, "hi\n"), f"async shell exec: {r!r}"
        r = await sb.exec("printf", args=["%s,", "x", "y z"], mode="argv", workdir="/tmp")
        assert r.stdout == "x,y z,", f"async argv exec: {r!r}"
        step("async exec shell and argv")

        # Several execs in one sandbox run at once.
        t0 = time.monotonic()
        results = await asyncio.gather(*(sb.exec(f"sleep 1; echo {i}") for i in range(3)))
        took = time.monotonic() - t0
        assert [r.stdout for r in results] == ["0\n", "1\n", "2\n"], f"concurrent execs: {results!r}"
        assert took < 2.5, f"three 1s execs took {took:.1f}s: not concurrent"
        step(f"async: 3 concurrent 1s execs in one sandbox took {took:.1f}s")

        chunks = [ch async for ch in sb.exec_stream("echo a; echo b >&2; exit 4")]
        out, err, exit_chunk, _ = collect(chunks)
        assert (out, err, exit_chunk.data) == ("a\n", "b\n", "4"), f"async stream: {chunks!r}"
        step("async exec_stream")

        await sb.write_file("/workspace/async.txt", "async\n", mode="600")
        assert await sb.read_file("/workspace/async.txt") == "async\n", "async read_file"
        names = [e["name"] for e in await sb.list_files("/workspace")]
        assert "async.txt" in names, f"async list_files: {names!r}"
        assert (await sb.stat_file("/workspace/async.txt"))["mode"] == "0600", "async stat_file"
        step("async write_file, read_file, list_files, stat_file")

        before = sb._info["expires_at"]
        await sb.extend_ttl("2h")
        assert parse_time(sb._info["expires_at"]) > parse_time(before), "async extend_ttl"
        await sb.destroy()
        try:
            await c.get(sb.id)
            raise AssertionError("async get of a destroyed sandbox should raise")
        except SandboxNotFound as e:
            assert e.code == "NOT_FOUND", f"async get: code {e.code!r}"
        try:
            await sb.destroy()
            raise AssertionError("async second destroy should raise")
        except SandboxNotFound as e:
            assert e.code == "NOT_FOUND", f"async destroy: code {e.code!r}"
        try:
            chunks = [ch async for ch in sb.exec_stream("true")]
            raise AssertionError(f"async exec_stream on a missing sandbox should raise, got {chunks!r}")
        except httpx.ResponseNotRead:
            pass  # the same SDK bug as the sync client, see missing_suite
        step("async extend_ttl, destroy, then SandboxNotFound / ResponseNotRead")

        d = await c.admission(**SPAWN)
        assert d.allowed is True, f"async admission: {d!r}"
        q = await c.quota_summary()
        assert q.total == 0, f"async quota_summary: {q!r}"
        name = f"sdk-e2e-async-{os.getpid()}"
        with Client(URL, api_key=API_KEY, user_id=OWNER, timeout=30.0) as sync:
            sync.templates.save(Template(name=name, image="host", provider="process"))
        tsb = await c.spawn_template(name)
        spawned.append(tsb.id)
        assert (await tsb.exec("echo async-template")).stdout == "async-template\n", "async exec in a template's sandbox"
        await tsb.destroy()
        with Client(URL, api_key=API_KEY, user_id=OWNER, timeout=30.0) as sync:
            sync.templates.delete(name)
        step("async spawn_template")


# ---------------------------------------------------------------------------


def cleanup():
    """Destroys what a failed run left behind (the daemon keeps sandboxes)."""
    try:
        with Client(URL, api_key=API_KEY, timeout=30.0) as c:
            live = {i.id for i in c.list()}
            for sid in spawned:
                if sid in live:
                    try:
                        c.get(sid).destroy()
                        print(f"cleanup: destroyed {sid}", file=sys.stderr)
                    except Exception as e:  # noqa: BLE001
                        print(f"cleanup: {sid}: {e}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001
        print(f"cleanup failed: {e}", file=sys.stderr)


def main():
    from importlib.metadata import version

    print(f"stacyvm {version('stacyvm')} (httpx {httpx.__version__}) against {URL}", flush=True)
    assert version("stacyvm") == "0.1.1", f"expected stacyvm 0.1.1, got {version('stacyvm')}"
    assert stacyvm.Client is Client, "stacyvm exports Client"
    t0 = time.monotonic()
    try:
        sync_suite()
        asyncio.run(async_suite())
    except BaseException:
        traceback.print_exc()
        cleanup()
        print("FAILED", file=sys.stderr, flush=True)
        return 1
    with Client(URL, api_key=API_KEY, timeout=30.0) as c:
        left = [i.id for i in c.list() if i.id in spawned]
    assert not left, f"sandboxes left behind: {left}"
    print(f"all SDK checks passed in {time.monotonic() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
