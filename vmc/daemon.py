"""The vmc daemon: brings the machine up, keeps it running, and stops it cleanly.

Start-up order: state folder → simulators (when configured) → MDB bus master and devices →
supervised tasks. Every task is created by ``Daemon`` and awaited on the way out; SIGTERM or
SIGINT stops the daemon within ``STOP_BUDGET_S``: tasks cancelled and awaited, the bus master's
line thread joined, every port closed, simulator children terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from drivers.errors import DriverError, MdbError
from drivers.mdb.bill import BillValidator as MdbBillDevice
from drivers.mdb.coin import CoinChanger as MdbChangerDevice
from drivers.mdb.device import DeviceEvent, DeviceState, MdbDevice, StateChanged
from drivers.mdb.line_process import LineProcessMaster
from drivers.mdb.master import Timing
from drivers.motor.base import MotorBoard
from drivers.motor.vmc96 import Vmc96Board
from vmc.cash import MdbBills, MdbChanger
from vmc.children import Child, start_child
from vmc.config import Config
from vmc.control import ControlServer
from vmc.errors import VmcError
from vmc.journal import Journal, JournalCorrupt
from vmc.journal.recovery import DeviceFacts, stock_levels
from vmc.machine import VendMachine

log = structlog.get_logger("vmc.daemon")

#: SIGTERM to exit: systemd's TimeoutStopSec is 5 s; we promise 2 s.
STOP_BUDGET_S = 2.0
#: Share of the budget given to cancelled tasks before the ports are closed under them.
TASK_CANCEL_TIMEOUT_S = 1.0
#: How long a cancelled task gets before it is cancelled again (within the budget above).
CANCEL_REPEAT_S = 0.1
#: At start, how long recovery waits for the cash devices to come up and report their own
#: counters (tube counts, stacker) before it goes on without them (they are then reconciled
#: as "unknown", see vmc/journal/recovery.py).
DEVICE_STARTUP_WAIT_S = 10.0
#: How often the daemon prunes acknowledged records past their retention.
PRUNE_INTERVAL_S = 24 * 3600.0


def _device_classes() -> dict[str, type[MdbDevice]]:
    from drivers.mdb.bill import BillValidator
    from drivers.mdb.cashless import CashlessReader
    from drivers.mdb.coin import CoinChanger

    return {"coin": CoinChanger, "bill": BillValidator, "cashless": CashlessReader}


class Daemon:
    """Owns every long-lived resource of one run of the machine."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state_dir = Path(config.machine.state_dir)
        self.children: list[Child] = []
        self.master: LineProcessMaster | None = None
        self.devices: dict[str, MdbDevice] = {}
        self.event_listeners: list[Callable[[DeviceEvent], None]] = []
        self.journal: Journal | None = None
        self.motor: MotorBoard | None = None
        self.machine: VendMachine | None = None
        self.control: ControlServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._failure: BaseException | None = None

    # --- task supervision ------------------------------------------------------------------

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Start a supervised task: if it ends with an error, the daemon stops with it."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("task failed", task=task.get_name(), error=repr(exc), exc_info=exc)
            self._failure = exc
            self._stop.set()

    def request_stop(self) -> None:
        self._stop.set()

    # --- bring-up --------------------------------------------------------------------------

    async def _start_mdb(self) -> None:
        mdb = self.config.mdb
        wanted = {
            name: dev
            for name, dev in (("coin", mdb.coin), ("bill", mdb.bill), ("cashless", mdb.cashless))
            if dev.enabled
        }
        if not wanted:
            log.info("no MDB devices configured")
            return
        port = mdb.port or ""
        if mdb.simulate:
            args = ["--devices", ",".join(wanted)]
            if mdb.sim_timing:
                args.append("--timing")
            child = await start_child(
                "mdb",
                "hil.sim",
                args,
                self.state_dir / "sim-mdb.link",
                self.state_dir / "sim-mdb.sock",
            )
            self.children.append(child)
            port = child.port
        # The line is served from a process of its own, so that nothing this process does
        # (JSON, TLS, a busy loop) can delay an ACK: see drivers/mdb/line_process.py.
        self.master = LineProcessMaster(
            "stream" if mdb.simulate else mdb.link,
            port,
            timing=Timing(slack_s=mdb.timing_slack_ms / 1000.0),
            pcap=mdb.pcap,
            trace=mdb.trace,
            realtime_priority=mdb.realtime_priority,
        )
        await self.master.open()
        if mdb.realtime_priority and not self.master.scheduling.startswith("SCHED_FIFO"):
            # Works, with a longer ACK tail under load (bench/README.md has the figures).
            log.warning(
                "mdb line process is not real-time",
                scheduling=self.master.scheduling,
                hint="grant LimitRTPRIO (systemd/vmc.service) or set mdb.realtime_priority = 0",
            )
        # MDB bus reset (BREAK) where the link can carry one; on simulated links each device is
        # reset with its own RESET command by its start-up sequence anyway.
        if await self.master.bus_reset():
            log.info("mdb bus reset sent")
        log.info(
            "mdb bus master started",
            port=port,
            link=mdb.link,
            pcap=str(mdb.pcap or ""),
            scheduling=self.master.scheduling,
        )
        classes = _device_classes()
        for name, dev_config in wanted.items():
            device = classes[name](
                self.master,
                poll_interval_s=dev_config.poll_interval_ms / 1000.0,
                on_event=self._on_device_event,
            )
            self.devices[name] = device
            self.spawn(f"mdb-{name}", device.run())

    def _on_device_event(self, event: DeviceEvent) -> None:
        if isinstance(event, StateChanged):
            log.info(
                "device state", device=event.device, state=event.state.value, detail=event.detail
            )
        else:
            log.info(
                "device event",
                device=event.device,
                kind=type(event).__name__,
                **_event_fields(event),
            )
        for listener in self.event_listeners:
            listener(event)

    async def _start_motor(self, stock: dict[str, int]) -> None:
        motor = self.config.motor
        if not self.config.slots:
            log.info("no slots configured: no motor board")
            return
        port = motor.port or ""
        if motor.simulate:
            args: list[str] = []
            for slot in self.config.slots:
                args += ["--stock", f"{slot.row},{slot.col},{stock.get(slot.id, slot.stock)}"]
            child = await start_child(
                "motor",
                "hil.sim.vmc96",
                args,
                self.state_dir / "sim-motor.link",
                self.state_dir / "sim-motor.sock",
                link_flag="--link-file",
            )
            self.children.append(child)
            port = child.port
        board = Vmc96Board(port)
        await board.open()
        self.motor = board
        log.info("motor board open", driver=motor.driver, port=port)

    async def _device_facts(self) -> DeviceFacts:
        """Wait (bounded) for the cash devices, then read their own counters for recovery."""
        cash = [d for name, d in self.devices.items() if name in ("coin", "bill")]
        all_ready = asyncio.Event()

        def check(_event: DeviceEvent | None = None) -> None:
            if all(d.state is DeviceState.READY for d in cash):
                all_ready.set()

        self.event_listeners.append(check)
        check()
        try:
            async with asyncio.timeout(DEVICE_STARTUP_WAIT_S):
                await all_ready.wait()
        except TimeoutError:
            log.warning(
                "cash devices not all ready; recovering without their counters",
                states={d.NAME: d.state.value for d in cash},
            )
        finally:
            self.event_listeners.remove(check)
        tube_counts = coin_values = None
        stacker = None
        changer = self.devices.get("coin")
        if isinstance(changer, MdbChangerDevice) and changer.state is DeviceState.READY:
            try:
                # Read now (acceptance is still off): the running counts follow POLL items.
                tubes = changer.change_tubes(await changer.tube_status())
            except MdbError as exc:
                log.warning("tube counts unavailable for recovery", error=str(exc))
            else:
                tube_counts = {t: n for t, (_v, n) in tubes.items()}
                coin_values = {t: v for t, (v, _n) in tubes.items()}
        validator = self.devices.get("bill")
        if isinstance(validator, MdbBillDevice) and validator.state is DeviceState.READY:
            try:
                stacker = (await validator.stacker()).count
            except MdbError as exc:
                log.warning("stacker count unavailable for recovery", error=str(exc))
        return DeviceFacts(tube_counts=tube_counts, coin_values=coin_values, stacker_count=stacker)

    async def _start_machine(self) -> None:
        journal = self.journal
        assert journal is not None
        changer = self.devices.get("coin")
        validator = self.devices.get("bill")
        machine = VendMachine(
            self.config,
            journal,
            changer=MdbChanger(changer) if isinstance(changer, MdbChangerDevice) else None,
            bills=MdbBills(validator) if isinstance(validator, MdbBillDevice) else None,
            motor=self.motor,
        )
        self.machine = machine
        self.event_listeners.append(machine.on_device_event)
        journal.on_health(lambda ok, reason: machine.set_fault("journal", None if ok else reason))
        if not journal.writable:
            machine.set_fault("journal", journal.health_reason or "journal not writable")
        self.spawn("vend-cycle", machine.run())
        self.control = ControlServer(Path(self.config.control.socket), machine)
        await self.control.start()
        facts = await self._device_facts()
        await machine.submit(lambda: machine.recover(facts))
        self.spawn("journal-prune", self._prune_daily())

    async def _prune_daily(self) -> None:
        journal = self.journal
        assert journal is not None
        while True:
            try:
                pruned = await journal.prune(_utc_now(), self.config.journal.retention_days)
                if pruned:
                    log.info("journal pruned", records=pruned)
            except VmcError as exc:
                log.warning("journal prune failed", error=str(exc))
            await asyncio.sleep(PRUNE_INTERVAL_S)

    # --- run -------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            log.info("vmc starting", machine=self.config.machine.id, state_dir=str(self.state_dir))
            try:
                self.journal = await Journal.open(
                    self.state_dir, min_free_bytes=self.config.journal.min_free_bytes
                )
            except JournalCorrupt as exc:
                log.error(
                    "journal database is corrupt; it was kept aside, not overwritten",
                    error=str(exc),
                    kept=list(exc.kept),
                )
                raise
            stock = stock_levels(await self.journal.levels())
            await self._start_mdb()
            await self._start_motor(stock)
            await self._start_machine()
            log.info("vmc running")
            await self._stop.wait()
            log.info("vmc stopping")
        except (VmcError, DriverError) as exc:
            log.error("vmc cannot start", error=str(exc))
            self._failure = exc
        finally:
            await self.shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if self._failure is not None:
            return 1
        log.info("vmc stopped")
        return 0

    async def shutdown(self) -> None:
        """Cancel and await every task, then close the bus and stop the children."""
        pending = set(self._tasks)
        deadline = asyncio.get_running_loop().time() + TASK_CANCEL_TIMEOUT_S
        while pending:
            # Cancelled again while still running: on Python 3.11 a cancellation that lands
            # just as an awaited future completes can be lost (asyncio.wait_for and friends).
            for task in pending:
                task.cancel()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            _done, pending = await asyncio.wait(pending, timeout=min(left, CANCEL_REPEAT_S))
        for task in pending:
            log.error("task did not stop in time", task=task.get_name())
        if self.control is not None:
            await self.control.close()
            self.control = None
        if self.motor is not None:
            with contextlib.suppress(DriverError):
                await self.motor.close()
            self.motor = None
        if self.master is not None:
            await self.master.close()
            self.master = None
        if self.journal is not None:
            await self.journal.close()
            self.journal = None
        for child in self.children:
            with contextlib.suppress(ProcessLookupError):
                await child.stop()
        self.children.clear()


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _event_fields(event: DeviceEvent) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in getattr(event, "__dataclass_fields__", {}):
        if name in ("device", "event"):
            continue
        value = getattr(event, name)
        fields[name] = value.value if hasattr(value, "value") else value
    return fields


async def run(config: Config) -> int:
    """Entry point for ``vmc run``: the exit status of the daemon."""
    return await Daemon(config).run()
