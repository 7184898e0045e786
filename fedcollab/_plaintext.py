"""One rule, for every command that connects, on when plaintext gRPC is allowed.

Mutual TLS is the default. Plaintext needs an explicit `--insecure`, is announced in red
at every start, and off loopback also needs `--force-insecure`. `--insecure` next to a
configured TLS table is refused rather than silently ignored or silently obeyed: the
user asked for two things that cannot both hold, and either guess is wrong for someone
(TLS winning hides that the flag did nothing; plaintext winning drops encryption that
the file asked for). The commands that call this: `coordinator serve`, `institution
run`, `model list|pull` and the operator's `study`, `institutions` and `model` commands.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from fedcollab.errors import ConfigError
from fedcollab.transport import is_loopback


def require_tls_or_insecure(*, tls: str | None, insecure: bool, force_insecure: bool, address: str, what: str,
                            no_tls_hint: str, console: Console) -> None:
    """Refuse a contradictory or unsafe choice; announce plaintext.

    `tls` names where mutual TLS is configured (e.g. "its [server.tls] table"), None when
    it is not; `what` names the command's source (its config file); `no_tls_hint` says
    how to configure TLS for this command."""
    if tls is not None:
        if insecure:
            raise ConfigError(f"{what} configures mutual TLS ({tls}) and --insecure was given: drop --insecure to "
                              f"connect over mutual TLS, or remove {tls} for a plaintext rehearsal")
        return
    if not insecure:
        raise ConfigError(f"{what} has no mutual TLS: {no_tls_hint} (see `fedcollab pki`), "
                          "or pass --insecure for a plaintext rehearsal on loopback")
    if not is_loopback(address) and not force_insecure:
        raise ConfigError(f"--insecure refused on {address}, which is not a loopback address: plaintext there "
                          "exposes updates and lets anyone join. Configure mutual TLS, or add --force-insecure")
    console.print(f"[bold red]PLAINTEXT: {escape(address)} without TLS. Traffic is unencrypted and identities are not "
                  "verified; for a local rehearsal only.[/]", markup=True, highlight=False)
