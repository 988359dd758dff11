"""scripts/lab (python -m lab): the appliance between a private clamd and a visible next hop.

    client (swaks, smtplib) -> 127.0.0.1:10026 clamsmtpd -> 127.0.0.1:10025 next hop (prints mail)
                                     |
                                     +-> private clamd (EICAR-only database)

`scripts/lab` stays up until Ctrl-C or SIGTERM; `scripts/lab --demo` sends one clean and one
EICAR message, shows what happened, and exits 0 if the clean one arrived and EICAR did not.
"""

from __future__ import annotations

import argparse
import email.policy
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

from . import EICAR, PrivateClamd, Received, RecordingNextHop, daemon_argv, stop_process
from .clamd import ClamdError

LAB_HOST = "127.0.0.1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/lab",
        description="Run clamsmtpd in a local lab: a private clamd, a next hop that prints what "
        "it receives, everything on 127.0.0.1.",
    )
    parser.add_argument("--demo", action="store_true",
                        help="send one clean and one EICAR message, report, and exit")
    parser.add_argument("--listen-port", type=int, default=10026,
                        help="port clamsmtpd listens on (default: %(default)s)")
    parser.add_argument("--next-hop-port", type=int, default=10025,
                        help="port of the recording next hop (default: %(default)s)")
    parser.add_argument("--action", choices=("drop", "bounce", "pass"), default="drop",
                        help="clamsmtpd Action for infected mail (default: %(default)s, "
                        "as clamsmtpd's own default)")
    parser.add_argument("--workdir",
                        help="directory for configs, sockets, logs and spool; kept afterwards "
                        "(default: a temporary directory, removed at exit)")
    parser.add_argument("--reference", action="store_true",
                        help="run the C clamsmtpd of the Debian clamsmtp package instead, "
                        "to compare")
    parser.add_argument("--start-timeout", type=float, default=30.0,
                        help="seconds to wait for clamsmtpd to accept connections")
    args = parser.parse_args(argv)
    for name in ("listen_port", "next_hop_port"):
        if not 0 < getattr(args, name) < 65536:
            parser.error(f"--{name.replace('_', '-')} must be 1..65535")
    if args.listen_port == args.next_hop_port:
        parser.error("--listen-port and --next-hop-port must differ")
    return args


def say(text: str = "") -> None:
    print(text, flush=True)


def write_config(workdir: Path, *, listen_port: int, next_hop_port: int, clamd_socket: str,
                 action: str) -> Path:
    spool = workdir / "spool"
    spool.mkdir(mode=0o700, exist_ok=True)
    spool.chmod(0o700)
    conf = workdir / "clamsmtpd.conf"
    conf.write_text(
        "# clamsmtpd.conf written by scripts/lab\n"
        f"Listen: {LAB_HOST}:{listen_port}\n"
        f"OutAddress: {LAB_HOST}:{next_hop_port}\n"
        f"ClamAddress: {clamd_socket}\n"
        f"TempDirectory: {spool}\n"
        "# Header: not set, so the default applies (X-Virus-Scanned: ClamAV using ClamSMTP)\n"
        f"Action: {action}\n"
        "TimeOut: 60\n"
    )
    return conf


def summary(message: Received) -> str:
    scanned = "yes" if message.header("X-Virus-Scanned") is not None else "no"
    infected = message.header("X-Virus-Infected")
    line = (f"next hop received: from=<{message.mail_from}> "
            f"to={','.join('<' + r + '>' for r in message.rcpt_tos)} "
            f"size={message.size} X-Virus-Scanned={scanned}")
    if infected is not None:
        line += f" X-Virus-Infected={infected!r}"
    subject = message.header("Subject")
    if subject is not None:
        line += f" subject={subject!r}"
    return line


def wait_for_greeting(proc: subprocess.Popen, port: int, timeout: float) -> str:
    """Wait until the daemon accepts on `port` and greets; return the greeting line."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"clamsmtpd exited with status {proc.returncode} during start-up")
        try:
            with socket.create_connection((LAB_HOST, port), timeout=5) as sock:
                greeting = sock.makefile("rb").readline().decode("utf-8", "replace").strip()
                sock.sendall(b"QUIT\r\n")
                return greeting
        except OSError as error:
            last_error = error
            time.sleep(0.2)
    raise RuntimeError(f"clamsmtpd did not accept on {LAB_HOST}:{port} within {timeout:.0f} s "
                       f"(last error: {last_error})")


def demo_message(subject: str, body: str, attachment: bytes | None = None) -> EmailMessage:
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = "alice@example.com"
    msg["To"] = "bob@example.com"
    msg["Subject"] = subject
    msg.set_content(body)
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="octet-stream",
                           filename="eicar.com")
    return msg


def send(port: int, msg: EmailMessage) -> str:
    """Send `msg` through the appliance; return the outcome as text."""
    try:
        with smtplib.SMTP(LAB_HOST, port, local_hostname="lab-client.test", timeout=60) as smtp:
            smtp.ehlo()
            smtp.mail("alice@example.com")
            code, reply = smtp.rcpt("bob@example.com")
            if code >= 400:
                return f"refused at RCPT: {code} {reply.decode(errors='replace')}"
            code, reply = smtp.data(bytes(msg))
            return f"{code} {reply.decode(errors='replace')}"
    except smtplib.SMTPResponseException as error:
        return f"{error.smtp_code} {error.smtp_error.decode(errors='replace')}"
    except (OSError, smtplib.SMTPException) as error:
        return f"failed: {error!r}"


def run_demo(port: int, next_hop: RecordingNextHop) -> bool:
    say()
    say("demo: sending a clean message ...")
    outcome = send(port, demo_message("lab demo: clean", "Hello from the clamsmtp lab.\n"))
    say(f"demo:   SMTP outcome: {outcome}")
    say("demo: sending a message with the EICAR test file attached ...")
    outcome = send(port, demo_message("lab demo: EICAR", "See attachment.\n", EICAR))
    say(f"demo:   SMTP outcome: {outcome}")
    time.sleep(0.5)  # delivery to the next hop is over by the end of DATA; a margin for the log
    subjects = [m.header("Subject") for m in next_hop.messages]
    clean_ok = "lab demo: clean" in subjects
    eicar_delivered = [m for m in next_hop.messages if EICAR in m.original_content]
    say(f"demo: the next hop received {len(next_hop.messages)} message(s): {subjects}")
    say(f"demo: clean message delivered: {'yes' if clean_ok else 'NO'}")
    if eicar_delivered:
        say(f"demo: EICAR delivered: YES (subject {eicar_delivered[0].header('Subject')!r}, "
            f"X-Virus-Infected={eicar_delivered[0].header('X-Virus-Infected')!r})")
    else:
        say("demo: EICAR delivered: no")
    return clean_ok and not eicar_delivered


def how_to_try(args: argparse.Namespace, workdir: Path, eicar_file: Path) -> None:
    server = f"{LAB_HOST}:{args.listen_port}"
    say()
    say("Try it (in another terminal):")
    say(f"  swaks --server {server} --from alice@example.com --to bob@example.com "
        "--header 'Subject: clean test'")
    say(f"  swaks --server {server} --from alice@example.com --to bob@example.com "
        f"--attach-type application/octet-stream --attach @{eicar_file}")
    say(f"Each message the next hop accepts is printed here. Files: {workdir}")
    say("Stop with Ctrl-C.")


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    own_workdir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="clamsmtp-lab-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_stop)
    clamd = next_hop = proc = None
    try:
        say(f"lab: work directory {workdir}")
        try:
            clamd = PrivateClamd(workdir / "clamd").start()
        except ClamdError as error:
            say(f"lab: {error}")
            return 1
        say(f"lab: clamd (pid {clamd.pid}) ready on {clamd.socket_path} with the EICAR signature")

        def show(message: Received) -> None:
            say(summary(message))

        next_hop = RecordingNextHop(LAB_HOST, args.next_hop_port, on_message=show)
        try:
            next_hop.start()
        except OSError as error:
            say(f"lab: cannot listen on {LAB_HOST}:{args.next_hop_port} for the next hop "
                f"({error.strerror or error}); choose another with --next-hop-port")
            return 1
        say(f"lab: next hop listening on {LAB_HOST}:{next_hop.port}")

        conf = write_config(workdir, listen_port=args.listen_port, next_hop_port=next_hop.port,
                            clamd_socket=clamd.socket_path, action=args.action)
        eicar_file = workdir / "eicar.com"
        eicar_file.write_bytes(EICAR)
        argv_daemon = daemon_argv(str(conf), debug_level=3, reference=args.reference)
        say(f"lab: starting {' '.join(argv_daemon)}")
        proc = subprocess.Popen(argv_daemon, stdin=subprocess.DEVNULL)
        try:
            greeting = wait_for_greeting(proc, args.listen_port, args.start_timeout)
        except RuntimeError as error:
            say(f"lab: {error}")
            say(f"lab: is port {args.listen_port} free? choose another with --listen-port")
            return 1
        say(f"lab: clamsmtpd (pid {proc.pid}) listening on {LAB_HOST}:{args.listen_port}, "
            f"greeting: {greeting}")
        say(f"lab: config {conf} (Action: {args.action})")

        if args.demo:
            ok = run_demo(args.listen_port, next_hop)
            say(f"demo: {'PASSED' if ok else 'FAILED'}")
            return 0 if ok else 1

        how_to_try(args, workdir, eicar_file)
        while proc.poll() is None:
            time.sleep(0.5)
        say(f"lab: clamsmtpd exited with status {proc.returncode}")
        return 1
    except (KeyboardInterrupt, _Stop):
        say()
        say("lab: stopping")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        if proc is not None:
            code = stop_process(proc)
            say(f"lab: clamsmtpd stopped (exit status {code})")
        if next_hop is not None:
            next_hop.stop()
        if clamd is not None:
            clamd.stop()
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        say("lab: stopped")


if __name__ == "__main__":
    sys.exit(main())
