"""``edgebrain keygen KEY``: an Ed25519 key pair for ``convert --sign`` / ``--verify-with``."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import EdgebrainError


@click.command(name="keygen")
@click.argument("key", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--pub", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Where to write the public key [default: KEY.pub].")
@click.option("--overwrite", is_flag=True, help="Replace existing key files.")
def command(key: Path, pub: Path | None, overwrite: bool) -> None:
    """Write a new Ed25519 private key KEY (PEM, PKCS#8, mode 0600) and its public key KEY.pub.

    \b
    Sign with the private key, hand the public key to whoever runs the artifacts:
      edgebrain convert MODEL ... --sign KEY
      edgebrain predict ARTIFACT IMAGES --verify-with KEY.pub
      edgebrain bench ARTIFACTS --data DATA --out OUT --verify-with KEY.pub
    The same files come from openssl:
      openssl genpkey -algorithm ed25519 -out KEY
      openssl pkey -in KEY -pubout -out KEY.pub
    """
    from ..signing import generate_keypair, key_id, load_public_key

    try:
        priv, public = generate_keypair(key, pub, overwrite=overwrite)
        kid = key_id(load_public_key(public))
    except EdgebrainError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"private key: {priv} (keep it secret)\npublic key:  {public} (key id {kid})")
