r"""Drive a milter with miltertest(8) Lua scripts from pytest, and a cookbook of verified idioms.

Everything below was checked by experiment against Debian bookworm's ``miltertest`` package
("OpenDKIM milter test facility v1.6.0", from opendkim 2.11.0~beta2, linked with Lua 5.3),
libmilter 8.17.1 and pymilter 1.0.5. Where the man page disagrees, this text is right for
that build.

Running a script
================

``run_miltertest(script, socket)`` writes ``script`` to a temporary file and runs
``miltertest -s FILE``. miltertest has no command-line option for the milter's address: the
script itself calls ``mt.connect(...)``. The helper therefore defines the Lua global
``MILTER_SOCKET`` (already in miltertest's own syntax, see ``miltertest_socket``) before the
script runs, plus one global per entry of ``defines`` (strings). It also runs the script
under ``xpcall`` so that a Lua error is printed to stderr with a traceback. This build of
miltertest exits 1 on a Lua error, including a syntax error, but prints no message at all.
The helper also defines three small Lua helpers, which are not part of miltertest:
``expect_ok(ret, what)``, ``expect_reply(conn, SMFIR_x, what)`` and ``reply_name(code)``.

Exit status: 0 when the script ends normally; 1 after ``error(...)``, a failed ``assert``,
a Lua syntax error, or an ``mt.*`` function that raised; ``n`` after ``os.exit(n)``. A crash
of miltertest itself shows up as a negative ``returncode`` (see "Limits").

Connect, with retries::

    -- MILTER_SOCKET is "unix:/path" or "inet:PORT@127.0.0.1"; 50 tries, 0.1 s apart
    local conn = mt.connect(MILTER_SOCKET, 50, 0.1)

  ``mt.connect`` raises a Lua error once the tries are used up. It never returns nil,
  although the man page says it does. Accepted forms: ``unix:/p``, ``local:/p``, a bare
  ``/p``, ``inet:PORT@HOST``, ``inet:PORT``. There is no ``inet6:`` support ("Invalid
  argument"). A unix path longer than 107 bytes is silently cut short. The environment
  variable ``MILTERTEST_RETRY_SPEED_FACTOR`` (an integer) multiplies the interval.

Connection info with an IP::

    expect_ok(mt.conninfo(conn, "client.example.org", "192.0.2.1"), "conninfo")
    -- pymilter: connect(hostname, socket.AF_INET (2), ("192.0.2.1", 12345))
    -- "2001:db8::1" -> AF_INET6 (10), ("2001:db8::1", 12345, 0, 0)
    -- "unspec"      -> family 0, hostaddr None

  If the host is nil, ``test.example.com`` is sent (not "localhost" as the man page says).
  If the IP is nil, the host name is looked up in DNS. The client port is always 12345.

Macros before a step::

    expect_ok(mt.conninfo(conn, "client.example.org", "192.0.2.1"), "conninfo")
    expect_ok(mt.helo(conn, "client.example.org"), "helo")   -- only if NOHELO is not set
    mt.macro(conn, SMFIC_MAIL, "i", "4XyZ1", "{auth_authen}", "alice")   -- all in ONE call
    expect_ok(mt.mailfrom(conn, "<alice@example.org>"), "mailfrom")
    -- other stages by command letter: EOM "E", EOH "N" (both tried), DATA "T"
    mt.macro(conn, string.byte("E"), "i", "4XyZ1")
    expect_ok(mt.eom(conn), "eom")

  Only ``SMFIC_CONNECT``, ``SMFIC_HELO``, ``SMFIC_MAIL`` and ``SMFIC_RCPT`` are predefined;
  any command byte works. A second ``mt.macro`` call for the same stage replaces the first
  one's macros. A step resets the macros of every later stage (libmilter
  ``mi_clr_macros``). So send a macro right before its step, and only after every earlier
  step has been sent explicitly: MAIL macros sent before an auto-filled CONNECT/HELO are
  lost. Otherwise macros stay visible to later callbacks: connect macros can still be
  read in ``eom()``, and MAIL macros carry over to the next message on the same connection.
  ``getsymval`` returns None for a macro that was not sent. miltertest ignores the
  milter's ``setsymlist`` and sends exactly what the script says.

Checking a reply code::

    expect_ok(mt.mailfrom(conn, "<reject@example.org>"), "mailfrom")
    if mt.getreply(conn) ~= SMFIR_REPLYCODE then   -- setreply() + REJECT/TEMPFAIL
        error("MAIL FROM: got " .. string.char(mt.getreply(conn)))
    end
    expect_reply(conn, SMFIR_REPLYCODE, "MAIL FROM")  -- the same, through the helper

  ``mt.getreply`` returns a Lua 5.3 float (99.0 for 'c'); comparing it with ``SMFIR_*`` works.
  Use ``string.char(r)`` to display it. Meaning: 'c' continue, 'a' accept, 'r' reject
  without setreply, 't' tempfail without setreply, 'd' discard, 'y' (``SMFIR_REPLYCODE``)
  reject OR tempfail after ``setreply``. You cannot tell a 550 from a 451 at this point.
  Before mt.eom, the text of a 'y' reply is read and thrown away, so the text given at
  CONNECT/HELO/MAIL/RCPT cannot be checked. Before any step, getreply is 0; after
  ``mt.negotiate`` it is 'O'.

Checking the SMTP reply text (end of message only)::

    expect_ok(mt.eom(conn), "eom")
    expect_reply(conn, SMFIR_REPLYCODE, "eom")
    assert(mt.eom_check(conn, MT_SMTPREPLY, "550", "5.7.1", "message rejected"))

  Pass all three arguments. The one- and two-argument forms compare "550" or "550 5.7.1"
  with the whole "550 5.7.1 text" and never match a reply that has text. An untrapped
  Python exception in a callback becomes
  ``("451", "4.3.0", "pymilter: untrapped exception in <milter name>")``.

A header inserted at index 0, an appended header, a deleted header::

    expect_ok(mt.eom(conn), "eom")
    expect_reply(conn, SMFIR_ACCEPT, "eom")
    -- pymilter addheader(name, value, 0) -> smfi_insheader -> MT_HDRINSERT
    assert(mt.eom_check(conn, MT_HDRINSERT, "Authentication-Results", "mx; spf=pass", 0))
    -- addheader(name, value) (idx -1) -> smfi_addheader -> MT_HDRADD, never MT_HDRINSERT
    assert(mt.eom_check(conn, MT_HDRADD, "X-Appended", "appended value"))
    -- chgheader(name, n, "") or (name, n, None) deletes the n-th field of that name
    -- (counting from 1) -> MT_HDRDELETE name [n]
    assert(mt.eom_check(conn, MT_HDRDELETE, "X-Spam-Flag", 1))
    -- the value of an added or inserted header: n counts from 0, the most recently added first
    assert(mt.getheader(conn, "Authentication-Results", 0) == "mx; spf=pass")

  The header name is compared case-sensitively everywhere. This version has no
  ``mt.getnumheaders``: loop over ``mt.getheader(conn, name, i)`` until it returns nil.
  ``MT_HDRCHANGE name [value]`` works, but do not pass it an index: the C code reads the
  index from the value argument, so a check with an index never matches. A deletion also
  counts as an MT_HDRCHANGE. Other checks, read from the source but not tried here:
  ``MT_BODYCHANGE [body]``, ``MT_RCPTADD rcpt``, ``MT_RCPTDELETE rcpt``.

Quarantine::

    assert(mt.eom_check(conn, MT_QUARANTINE))                     -- any reason
    assert(mt.eom_check(conn, MT_QUARANTINE, "test quarantine"))  -- exact reason

Several messages on one connection::

    expect_ok(mt.mailfrom(conn, "<a@example.org>"), "mailfrom")  -- ALWAYS explicit
    ...
    mt.disconnect(conn)            -- sends QUIT; mt.disconnect(conn, false) just closes

  The changes recorded at EOM are only cleared by an explicit ``mt.mailfrom``.
  ``mt.abort`` does not clear them, and neither does a MAIL that miltertest fills in
  itself. Without the explicit call, ``mt.eom_check`` sees the previous message's changes.

Negotiation gotchas
===================

* miltertest offers every action (0x1FF) and every protocol bit (0x1FFFFF): all NO and
  NR bits, but not SMFIP_MDS_256K or SMFIP_MDS_1M.
* pymilter's ``Milter.Base`` negotiates ``SMFIP_NO*`` for every callback a subclass does not
  override, including unknown() and data(). Sending such a step raises a Lua error, e.g.
  "mt.header(): negotiated SMFIP_NOHDRS", and the script exits 1. This applies to
  conninfo, helo, rcptto, header, eoh, bodystring/bodyfile/bodyrandom, data and unknown.
  Guard optional steps::

      if not mt.test_option(conn, SMFIP_NOHDRS) then
          expect_ok(mt.header(conn, "Subject", "hi"), "header")
      end

  ``mt.eom`` quietly skips the steps that were negotiated away when it fills in the
  missing ones.
* ``@Milter.noreply`` sets ``SMFIP_NR_*``. For such a stage, miltertest does not wait for
  a reply, and ``mt.getreply`` returns ``SMFIR_CONTINUE`` whatever the milter did. NR
  bits never cause an error; only the NO bits do. If the callback returns REJECT anyway,
  or raises (pymilter's noreply wrapper raises RuntimeError if the callback does not
  return CONTINUE), libmilter drops the reply and logs "milter claimed not to reply"
  to syslog. It still goes back to its HELO state, so it silently ignores the next
  RCPT/header. miltertest then waits ``mt.set_timeout`` seconds (10 by default) and
  prints "select(): timeout". An explicit step then returns "mt.milter_read() failed";
  a step miltertest fills in itself raises a Lua error with no message. A real
  REJECT at MAIL has the same effect on any RCPT sent after it.
* ``mt.negotiate(conn, version, PROTOCOL, ACTIONS)``: the 3rd argument is the SMFIP_* steps
  and the 4th the SMFIF_* actions, the reverse of the man page. Pass nil for a default.
  ``mt.test_option(conn, SMFIP_x)`` and ``mt.test_action(conn, SMFIF_x)`` report what the
  milter asked for.

Limits and other traps
======================

* The buffer for one milter packet is 1024 bytes and is not bounds-checked. Two things
  overflow it: ``mt.header`` with len(name) + len(value) + 2 > 1024, and any single EOM
  change the milter sends (e.g. an added header whose name + value + 2 > 1024). The
  result is "*** stack smashing detected ***" and returncode -6, or silent corruption
  when the overflow is only a few bytes.
* ``mt.bodyfile`` sends 65536-byte chunks, but libmilter accepts at most 65535. A body
  file of 64 KiB or more makes the milter drop the connection, and miltertest then dies
  of SIGPIPE (returncode -13). Send large bodies as several ``mt.bodystring`` calls of at
  most 65535 bytes. bodystring stops at the first NUL byte.
* Explicit steps return nil, or an error string on I/O failure: "mt.milter_read() failed"
  after a timeout, and so on. They do not raise, so wrap them in ``expect_ok``.
* Steps that miltertest fills in use fixed data: host test.example.com [12.34.56.78],
  HELO test.example.com, MAIL <sender@example.com>, RCPT <recipient@example.com>, header
  "From: <sender@example.com>", body "Dummy message body.\r\n". miltertest carries on
  even if the milter rejected one of these steps.
* ``mt.echo`` takes exactly one string or number. stdout is block-buffered when it is a
  pipe, so output would be lost if miltertest crashed. The helper runs it under
  ``stdbuf -oL`` when stdbuf is available.

pymilter behaviour seen from the MTA side
=========================================

* If the MTA drops the connection during a transaction (``mt.disconnect(conn, false)``),
  pymilter calls ``abort()`` and then ``close()``; no exception is raised. If it drops the
  connection while ``eom()`` is running, the next modification call raises
  ``milter.error`` (also ``Milter.error``), e.g. "cannot add header". The first call after
  the peer closed may still succeed. Then ``close()`` is called, without ``abort()``.
* ``Milter.set_flags(...)`` has no effect: ``Base.negotiate`` hands back all the actions the
  MTA offered. To restrict actions, override ``negotiate`` and set
  ``opts[0] = self._actions = ...`` after calling ``super().negotiate(opts)``. Calling an
  action that was not negotiated raises ``Milter.DisabledAction``.
* ``Base.setsymlist`` and ``@Milter.symlist`` fail on Python 3 with "TypeError: setsymlist()
  argument 2 must be str, not bytes". With ``@symlist``, ``Base.negotiate`` swallows the
  error and returns ALL_OPTS, which silently drops every ``@noreply`` NR bit. Use
  ``self._ctx.setsymlist(Milter.M_ENVFROM, "{auth_authen} i")`` (a single space-separated
  str) in an overridden ``negotiate``. This needs SMFIF_SETSYMLIST to have been offered.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "LUA_PRELUDE",
    "MILTERTEST",
    "lua_string",
    "miltertest_available",
    "miltertest_socket",
    "run_miltertest",
]

#: The miltertest binary (``$MILTERTEST`` overrides the search).
MILTERTEST: str = (
    os.environ.get("MILTERTEST") or shutil.which("miltertest") or "/usr/bin/miltertest"
)

# sizeof(struct sockaddr_un.sun_path) on Linux, including the terminating NUL
_SUN_PATH_MAX = 108

_LUA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

_LUA_ESCAPES = {
    ord("\\"): "\\\\",
    ord('"'): '\\"',
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}

#: Lua helpers defined before every script run by :func:`run_miltertest`.
LUA_PRELUDE = """\
function reply_name(code)
  if code == nil then return "nil" end
  local names = {
    [SMFIR_CONTINUE] = "SMFIR_CONTINUE", [SMFIR_ACCEPT] = "SMFIR_ACCEPT",
    [SMFIR_REJECT] = "SMFIR_REJECT", [SMFIR_TEMPFAIL] = "SMFIR_TEMPFAIL",
    [SMFIR_DISCARD] = "SMFIR_DISCARD", [SMFIR_REPLYCODE] = "SMFIR_REPLYCODE",
  }
  if SMFIR_SKIP then names[SMFIR_SKIP] = "SMFIR_SKIP" end
  local name = names[code] or "?"
  if code > 0 and code < 256 then
    return string.format("%s ('%s')", name, string.char(math.floor(code)))
  end
  return string.format("%s (%s)", name, tostring(code))
end

function expect_ok(ret, what)
  if ret ~= nil then
    error(string.format("%s failed: %s", what or "mt call", tostring(ret)), 2)
  end
end

function expect_reply(conn, want, what)
  local got = mt.getreply(conn)
  if got ~= want then
    error(string.format("%s: expected %s, got %s", what or "reply",
                        reply_name(want), reply_name(got)), 2)
  end
end
"""

_WRAPPER_TAIL = """\
local ok, err = xpcall(dofile, debug.traceback, {script})
if not ok then
  io.stderr:write("miltertest script error: ", tostring(err), "\\n")
  io.stderr:flush()
  error(err, 0)
end
"""


def miltertest_available() -> bool:
    """True if the miltertest binary exists and is executable."""
    return os.access(MILTERTEST, os.X_OK)


def lua_string(value: str | bytes) -> str:
    """Quote ``value`` as a double-quoted Lua string literal (pure ASCII, 8-bit exact).

    A ``str`` is encoded as UTF-8 (surrogate escapes give back their original bytes).
    Backslash, double quote, \\n, \\r and \\t use their short escapes. Other control
    characters, DEL and every byte above 0x7f become a three-digit decimal escape
    (``\\ddd``), so a digit that follows cannot be misread. NUL is encoded as well, but
    most mt.* functions stop at the first NUL because they use C's strlen.
    """
    data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)
    out = ['"']
    for byte in data:
        escape = _LUA_ESCAPES.get(byte)
        if escape is not None:
            out.append(escape)
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03d}")
    out.append('"')
    return "".join(out)


def miltertest_socket(socket: str | os.PathLike[str]) -> str:
    """Convert a milter socket spec into what ``mt.connect`` accepts.

    ``unix:/p``, ``local:/p``, a path (or a ``Path``) -> ``unix:/p``;
    ``inet:PORT@HOST`` stays as it is; ``inet:PORT`` -> ``inet:PORT@127.0.0.1``.
    ``inet6:`` raises ValueError, because miltertest cannot connect to IPv6. So does a unix
    path too long for ``sun_path``, which miltertest would silently cut short.
    """
    spec = os.fspath(socket)
    if isinstance(socket, os.PathLike) or spec.startswith(("/", "./", "../")):
        spec = "unix:" + spec
    scheme, sep, rest = spec.partition(":")
    scheme = scheme.lower()
    if not sep or not rest:
        raise ValueError(f"not a milter socket spec: {spec!r}")
    if scheme in ("unix", "local"):
        if len(os.fsencode(rest)) >= _SUN_PATH_MAX:
            raise ValueError(
                f"unix socket path is {len(os.fsencode(rest))} bytes; miltertest cuts it "
                f"at {_SUN_PATH_MAX - 1}: {rest!r}"
            )
        return "unix:" + rest
    if scheme == "inet":
        port, _, host = rest.partition("@")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad port in milter socket spec: {spec!r}")
        return f"inet:{int(port)}@{host or '127.0.0.1'}"
    if scheme == "inet6":
        raise ValueError(f"miltertest cannot connect to inet6 sockets: {spec!r}")
    raise ValueError(f"unknown milter socket type {scheme!r} in {spec!r}")


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return data


def _numbered(script: str) -> str:
    return "\n".join(f"{n:4d} | {line}" for n, line in enumerate(script.splitlines(), 1))


def _hints(returncode: int | None, stderr: str) -> list[str]:
    hints = []
    if returncode == -signal.SIGABRT or "stack smashing" in stderr:
        hints.append(
            "miltertest crashed (SIGABRT): a milter packet over 1024 bytes overflowed its "
            "buffer, e.g. mt.header() or a header the milter added at EOM"
        )
    if returncode == -signal.SIGPIPE:
        hints.append(
            "miltertest died of SIGPIPE: the milter closed the connection (mt.bodyfile() "
            "with a file of 64 KiB or more does this; use mt.bodystring chunks <= 65535)"
        )
    if "select(): timeout" in stderr:
        hints.append(
            "the milter did not answer a step: either a rejected or no-reply (NR) stage "
            "put libmilter back in the HELO state and it ignored a step sent out of "
            "order, or the callback took longer than mt.set_timeout()"
        )
    if "negotiated SMFIP_NO" in stderr:
        hints.append(
            "the script sent a step that the milter negotiated away (pymilter does this "
            "for every callback it does not override); guard it with mt.test_option()"
        )
    if "mt.connect()" in stderr:
        hints.append("could not connect: is the milter listening on MILTER_SOCKET yet?")
    return hints


def _failure(
    what: str, script: str, returncode: int | None, stdout: str, stderr: str
) -> AssertionError:
    lines = [what]
    lines += [f"hint: {hint}" for hint in _hints(returncode, stderr)]
    lines += ["--- script ---", _numbered(script)]
    lines += ["--- stdout ---", stdout.rstrip("\n"), "--- stderr ---", stderr.rstrip("\n")]
    return AssertionError("\n".join(lines))


def run_miltertest(
    script: str,
    socket: str | os.PathLike[str],
    timeout: float = 30,
    *,
    check: bool = True,
    defines: Mapping[str, str | bytes] | None = None,
    verbose: int = 0,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the Lua ``script`` with miltertest against the milter at ``socket``.

    The script reaches the milter with ``mt.connect(MILTER_SOCKET, 50, 0.1)``. The global
    ``MILTER_SOCKET`` is ``miltertest_socket(socket)``, and every ``defines`` entry becomes
    a string global too. The prelude helpers (``expect_ok``, ``expect_reply``,
    ``reply_name``) are defined first. ``verbose`` adds that many ``-v`` flags, which make
    miltertest trace each protocol step on stdout. Relative paths in the script (for
    ``mt.bodyfile``) are taken from ``cwd``.

    Returns the CompletedProcess with text stdout and stderr. With ``check`` (the
    default), an AssertionError is raised if miltertest exits non-zero or runs longer
    than ``timeout`` seconds. Its message holds the numbered script, stdout, stderr, and
    hints for the known failure patterns.
    """
    globals_: dict[str, str | bytes] = {"MILTER_SOCKET": miltertest_socket(socket)}
    for name, value in (defines or {}).items():
        if not _LUA_NAME.match(name):
            raise ValueError(f"not a Lua identifier: {name!r}")
        globals_[name] = value

    with tempfile.TemporaryDirectory(prefix="miltertest-") as tmp:
        script_path = Path(tmp, "script.lua")
        script_path.write_text(script, encoding="utf-8")
        wrapper = ["-- generated by run_miltertest()"]
        wrapper += [f"{name} = {lua_string(value)}" for name, value in globals_.items()]
        wrapper.append(LUA_PRELUDE)
        wrapper.append(_WRAPPER_TAIL.format(script=lua_string(str(script_path))))
        wrapper_path = Path(tmp, "wrapper.lua")
        wrapper_path.write_text("\n".join(wrapper), encoding="utf-8")

        cmd = [MILTERTEST] + ["-v"] * verbose + ["-s", str(wrapper_path)]
        stdbuf = shutil.which("stdbuf")
        if stdbuf:
            cmd = [stdbuf, "-oL", "-eL", *cmd]
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                encoding="utf-8",
                errors="replace",
                timeout=timeout,
                cwd=cwd,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            if check:
                raise _failure(
                    f"miltertest did not finish within {timeout} s",
                    script,
                    None,
                    _text(exc.stdout),
                    _text(exc.stderr),
                ) from None
            return subprocess.CompletedProcess(
                cmd, -signal.SIGKILL, _text(exc.stdout), _text(exc.stderr)
            )

    if check and proc.returncode != 0:
        raise _failure(
            f"miltertest exited with status {proc.returncode}",
            script,
            proc.returncode,
            proc.stdout,
            proc.stderr,
        )
    return proc
