"""Run simulated MDB peripherals as their own process.

    python -m hil.sim --devices coin,bill,cashless --pty-link /tmp/mdb.link [--timing]
                      [--control /tmp/mdb-sim.sock] [--state /tmp/sim-mdb.state.json]
    python -m hil.sim --devices coin --tcp 127.0.0.1:5000

With ``--pty-link`` the pty path the VMC should open is written to that file once the bus is
serving (and again when ``drop_link`` replaces the pty); with ``--tcp`` the simulators listen
there (the VMC's port is ``socket://HOST:PORT``). With ``--state`` the devices' physical state
(tube contents, stacker count, jams) is loaded from that file if it exists and saved to it
whenever it changes, as real hardware keeps its coins across a restart.
Stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from types import FrameType

from hil.sim.bus import SimBus
from hil.sim.control import ControlServer, dispatch
from hil.sim.peripheral import SimPeripheral
from hil.sim.state import SimStateFile

#: name -> (module, class) of each simulator; imported on demand.
SIMULATORS = {
    "coin": ("hil.sim.coin", "CoinChangerSim"),
    "bill": ("hil.sim.bill", "BillValidatorSim"),
    "cashless": ("hil.sim.cashless", "CashlessReaderSim"),
}


def make_simulator(name: str) -> SimPeripheral:
    try:
        module_name, class_name = SIMULATORS[name]
    except KeyError:
        raise SystemExit(
            f"unknown simulated device {name!r}; known: {', '.join(SIMULATORS)}"
        ) from None
    cls = getattr(importlib.import_module(module_name), class_name)
    device = cls()
    assert isinstance(device, SimPeripheral)
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hil.sim", description=__doc__.split("\n")[1])
    parser.add_argument("--devices", default="coin,bill,cashless")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--pty-link", help="write the pty path here")
    where.add_argument("--tcp", help="listen on HOST:PORT")
    parser.add_argument("--timing", action="store_true", help="emulate 9600-baud word timing")
    parser.add_argument("--control", help="unix socket path for the control interface")
    parser.add_argument(
        "--state", help="keep the devices' physical state (tubes, stacker) in this file"
    )
    args = parser.parse_args(argv)

    peripherals = [make_simulator(n.strip()) for n in args.devices.split(",") if n.strip()]
    state_file = None
    if args.state:
        state_file = SimStateFile(args.state, peripherals)
        try:
            state_file.load()
            state_file.save_if_changed()  # an unwritable path fails here, not mid-session
        except (OSError, ValueError) as exc:
            raise SystemExit(f"hil.sim: --state {args.state}: {exc}") from exc
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        bus = SimBus.on_tcp(peripherals, host or "127.0.0.1", int(port), timing=args.timing)
    else:
        bus = SimBus.on_pty(peripherals, timing=args.timing)
    bus.state_file = state_file
    control = None
    if args.control:
        control = ControlServer(args.control, lambda req: dispatch(peripherals, req, bus))
        control.start()
    bus.start()
    if args.pty_link:
        bus.publish_link_file(args.pty_link)
    print(f"hil.sim: {', '.join(p.NAME for p in peripherals)} on {bus.port}", flush=True)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(0.5):
        pass
    bus.stop()
    if control is not None:
        control.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
