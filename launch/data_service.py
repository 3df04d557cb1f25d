r"""Runs one tf.data service server: the dispatcher or a worker.

TensorFlow's own servers (`tf.data.experimental.service.DispatchServer`,
`WorkerServer`); training reads from them with `--config.data.service=`.

  # one machine (or a small job): the dispatcher
  python -m launch.data_service --role=dispatcher --port=5050
  # each input machine: a worker, reachable by the training hosts
  python -m launch.data_service --role=worker --dispatcher=HOST:5050 \
      --port=5051 --worker_address=$(hostname):5051
  # training
  python -m launch.train ... --config.data.service=HOST:5050

The server runs until SIGINT or SIGTERM (exit 0). It prints one line,
`serving <role> at host:port`, once it listens. `launch.local
--data_service_workers=N` starts a dispatcher and N workers this way on
localhost. Trust: like the training workers' gRPC servers, these listen on
every interface without authentication (docs/outputs.md, Trust boundary).
"""

import signal
import socket
import sys
import threading

from absl import app, flags

from launch.status import ExitStatus

_ROLE = flags.DEFINE_enum("role", None, ["dispatcher", "worker"],
                          "Which server to run.")
_PORT = flags.DEFINE_integer("port", 0, "Port to listen on (0: any free one).",
                             lower_bound=0)
_DISPATCHER = flags.DEFINE_string(
    "dispatcher", "", "worker: the dispatcher's host:port.")
_WORKER_ADDRESS = flags.DEFINE_string(
    "worker_address", "", "worker: the host:port training hosts reach it at "
    "(default localhost:<port>; set it on a cluster).")
_WORK_DIR = flags.DEFINE_string(
    "work_dir", "", "dispatcher: a directory to journal its state in, so a "
    "restarted dispatcher keeps its jobs (fault_tolerant_mode).")


def _check_port_free(port: int) -> None:
  """gRPC binds with SO_REUSEPORT: a second server on a taken port would
  start and share it silently. Refuse that before starting."""
  if not port:
    return
  with socket.socket() as s:
    try:
      s.bind(("", port))
    except OSError as e:
      raise ValueError(f"port {port} is in use ({e.strerror}); pick another "
                       "--port") from None


def _serve() -> str:
  """Starts the server; returns the address it listens on."""
  _check_port_free(_PORT.value)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  service = tf.data.experimental.service
  if _ROLE.value == "dispatcher":
    server = service.DispatchServer(service.DispatcherConfig(
        port=_PORT.value, work_dir=_WORK_DIR.value or None,
        fault_tolerant_mode=bool(_WORK_DIR.value)))
    address = server.target.split("://", 1)[1]
  else:
    if not _DISPATCHER.value:
      raise ValueError("--role=worker needs --dispatcher=HOST:PORT")
    config = {"dispatcher_address": _DISPATCHER.value.split("://")[-1],
              "port": _PORT.value}
    if _WORKER_ADDRESS.value:
      config["worker_address"] = _WORKER_ADDRESS.value
    server = service.WorkerServer(service.WorkerConfig(**config))
    address = server._address  # pylint: disable=protected-access
  _serve.server = server  # kept alive until the process ends
  return address


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(ExitStatus.BAD_INPUT)
  if _ROLE.value is None:
    print("error: --role=dispatcher or --role=worker is required",
          file=sys.stderr)
    sys.exit(ExitStatus.BAD_INPUT)
  stop = threading.Event()
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, lambda *_: stop.set())
  try:
    address = _serve()
  except (ValueError, RuntimeError) as e:  # bad flags, port taken
    print(f"error: {_ROLE.value}: {str(e).strip().splitlines()[0]}",
          file=sys.stderr)
    sys.exit(ExitStatus.BAD_INPUT)
  print(f"serving {_ROLE.value} at {address}", flush=True)
  stop.wait()


if __name__ == "__main__":
  app.run(main)
