"""A throw-away S3 server on this machine holding a dataset, for trying ``--data s3://...`` without a cloud.

    python scripts/local_s3.py DATASET_DIR BUCKET [--port N] [--ready FILE]

Starts moto's S3 server on 127.0.0.1, uploads DATASET_DIR's files to s3://BUCKET/ds/ readable without
credentials (as the real dataset's bucket is), writes the endpoint URL to FILE (or prints it) and serves until
SIGTERM or Ctrl-C. Then, for example:

    cloudmask train --data s3://BUCKET/ds --set data.remote.endpoint_url=http://127.0.0.1:PORT

Needs the test extra (moto[server], boto3). Never expose it beyond localhost: it accepts any credentials.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("bucket")
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--ready", type=Path, help="write the endpoint URL here once the data is uploaded")
    args = parser.parse_args()
    files = sorted(p for p in args.dataset.rglob("*") if p.is_file())
    if not files:
        parser.error(f"{args.dataset}: no files to serve")
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        parser.error(f"{e.name} is not installed: pip install 'cloudmask-bench[test]'")

    port = args.port or _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    admin = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="admin",
                         aws_secret_access_key="admin")
    admin.create_bucket(Bucket=args.bucket, ACL="public-read")
    for path in files:
        admin.upload_file(str(path), args.bucket, f"ds/{path.relative_to(args.dataset).as_posix()}",
                          ExtraArgs={"ACL": "public-read"})
    if args.ready:
        args.ready.write_text(url + "\n")
    print(f"{url}: s3://{args.bucket}/ds holds {len(files)} files", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            signal.pause()
    except KeyboardInterrupt:
        pass
    server.stop()
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
