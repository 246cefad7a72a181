"""The `fastserve` command. Each sub-command lives in its own module and stays thin."""

from __future__ import annotations

import os

import typer

# gRPC's C core logs every refused TLS handshake at INFO; a stranger on the LAN is expected,
# and the host says in its own words which machine could not prove the token.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from cli import bench, chat, join, models, pull, serve, status, token

app = typer.Typer(
    name="fastserve",
    help="Chat with a large language model on this machine or a LAN cluster of CPU machines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("pull")(pull.command)
app.command("models")(models.command)
app.command("chat")(chat.command)
app.command("bench")(bench.command)
app.command("join")(join.command)
app.command("status")(status.command)
app.command("serve")(serve.command)
app.command("token")(token.command)


if __name__ == "__main__":
    app()
