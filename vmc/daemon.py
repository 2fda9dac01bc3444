"""The vmc daemon: brings the machine up, keeps it running, and stops it cleanly.

Start-up order: state folder → journal → simulators (when configured) → MDB bus master and
devices → motor board → vend cycle, control interface, recovery → cloud link (``[cloud]
enabled``: started as a task, it never delays the machine) → "vmc running", logged only
once the acceptors the machine wants on are enabled on the wire (or it has decided it cannot
take money: then it says why, at WARNING).

Every task is created by ``Daemon`` and awaited on the way out. SIGTERM or SIGINT (and every
fatal error that ends the daemon) stops it within ``STOP_BUDGET_S``, in this order:

1. wind-down, bounded by ``WIND_DOWN_TIMEOUT_S``, while the bus master and the journal are
   still open: the control interface refuses new selections, the machine takes a ``stopping``
   fault (it wants no money any more), every acceptor and reader is disabled on the wire
   (``MdbDevice.stop_accepting_now``), the vend cycle's current step may finish, and the devices
   poll on until they are quiet, so that money already in flight is reported and journaled;
2. the cloud link publishes ``online: false`` and disconnects (bounded by
   ``vmc.cloud.wiring.CLOUD_STOP_TIMEOUT_S``); the control interface closes: subscribers get
   ``closing``, a request still waiting gets ``{"ok": false, "error": "closing"}``;
3. tasks cancelled and awaited, the motor board and the bus master closed, the journal closed,
   simulator children terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import structlog

from drivers.errors import DriverError, MdbError
from drivers.mdb.bill import BillValidator as MdbBillDevice
from drivers.mdb.coin import CoinChanger as MdbChangerDevice
from drivers.mdb.device import (
    DeviceEvent,
    DeviceState,
    MdbDevice,
    StateChanged,
    StatusReported,
)
from drivers.mdb.line_process import LineProcessMaster
from drivers.mdb.master import Timing
from drivers.motor.base import MotorBoard
from drivers.motor.vmc96 import Vmc96Board
from vmc.cash import MdbBills, MdbChanger
from vmc.children import Child, start_child
from vmc.config import Config
from vmc.console.serial import SerialConsole
from vmc.control import ControlServer
from vmc.dex.hooks import dex_port_task
from vmc.errors import VmcError
from vmc.journal import Journal, JournalCorrupt
from vmc.journal.recovery import DeviceFacts, stock_levels
from vmc.log import FailureLog
from vmc.machine import MDB_LINK_FAULT, STOPPING_FAULT, VendMachine
from vmc.service import ServiceReporter, reporter_from_environment, status_line
from vmc.technician import Technician

if TYPE_CHECKING:
    # Imported where the cloud link starts: a cash-only machine never loads them (MQTT, TLS,
    # cryptography, qrcode and PIL are half the daemon's memory; bench/footprint.py).
    from vmc.cloud.wiring import CloudWiring

log = structlog.get_logger("vmc.daemon")

#: SIGTERM to exit: systemd's TimeoutStopSec is 5 s; we promise 2 s.
STOP_BUDGET_S = 2.0
#: Share of the budget for the wind-down with the bus still open: acceptors off on the wire,
#: the vend cycle's current step, the devices' last reports. A vend that needs longer is cut
#: (its intent stays open; start-up recovery settles it) and its client told "closing".
WIND_DOWN_TIMEOUT_S = 0.8
#: Within the wind-down: how long disabling the acceptors on the wire may take.
ACCEPTORS_OFF_TIMEOUT_S = 0.4
#: The devices count as quiet after this many of their POLL intervals without a report.
QUIET_POLLS = 2
#: Share of the budget given to cancelled tasks before the ports are closed under them.
TASK_CANCEL_TIMEOUT_S = 0.3
#: How long a cancelled task gets before it is cancelled again (within the budget above).
CANCEL_REPEAT_S = 0.1
#: At start, how long recovery waits for the cash devices to come up and report their own
#: counters (tube counts, stacker) before it goes on without them (they are then reconciled
#: as "unknown", see vmc/journal/recovery.py).
DEVICE_STARTUP_WAIT_S = 10.0
#: How often the daemon prunes acknowledged records past their retention.
PRUNE_INTERVAL_S = 24 * 3600.0
#: At start, how long "vmc running" waits for the acceptors to be enabled on the wire.
ACCEPTING_WAIT_S = 5.0
#: How often that wait looks again (the enable goes out at a device's next POLL turn).
ACCEPTING_CHECK_S = 0.01
#: Share of the stop budget for the cloud link: ``online: false`` and the DISCONNECT.
CLOUD_STOP_TIMEOUT_S = 0.5

LinkListener = Callable[[bool, str], None]


@runtime_checkable
class LinkReporting(Protocol):
    """A bus master that reports its link (``drivers.mdb.line_process.LineProcessMaster``):
    while the link is down it reopens the port itself and requests fail with LinkClosed."""

    link_up: bool
    #: Why the link is down, or the port while it is up.
    link_detail: str

    def add_link_listener(self, listener: LinkListener) -> None:
        """``listener(up, detail)`` on the event loop at every change."""


#: The embedded MDB simulator's physical state (tubes, stacker), in the state folder.
SIM_MDB_STATE_FILE = "sim-mdb.state.json"


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
        #: Set once the journal is open (the MDB line starts meanwhile: see ``run``).
        self._journal_open = asyncio.Event()
        self._failure: BaseException | None = None
        self._vend_task: asyncio.Task[None] | None = None
        #: The MDB link as the control interface shows it: {"state": "up"|"down", "detail"}.
        self.mdb_link: dict[str, str] | None = None
        self._mdb_link_log = FailureLog(log)
        self._last_device_event = 0.0
        self._shut_down = False
        self._winding_down = False
        #: The cloud side (link, sync, telemetry, commands, QR) while ``[cloud] enabled``.
        self.cloud: CloudWiring | None = None
        self._started_mono = 0.0
        #: READY, STATUS, WATCHDOG, STOPPING for systemd (vmc/service.py), once running.
        self.service: ServiceReporter | None = None

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
            # The simulated devices keep their coins and bills across restarts, as hardware
            # does: otherwise every restart would journal tube corrections.
            args += ["--state", str(self.state_dir / SIM_MDB_STATE_FILE)]
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
        self._watch_link(self.master, port)
        if mdb.realtime_priority and not self.master.scheduling.startswith("SCHED_FIFO"):
            # Works, with a longer ACK tail under load (bench/README.md has the figures).
            log.warning(
                "mdb line process is not real-time",
                scheduling=self.master.scheduling,
                hint="grant LimitRTPRIO (systemd/vmc.service) or set mdb.realtime_priority = 0",
            )
        # MDB bus reset (BREAK) where the link can carry one; on simulated links each device is
        # reset with its own RESET command by its start-up sequence anyway. A line process
        # started before the daemon's imports has done it, and RESET the devices (`vmc run`,
        # drivers/mdb/line_spawn.py): another BREAK would undo that.
        if self.master.started_early:
            log.info(
                "mdb devices started early by the line process",
                bus_reset=self.master.early_bus_reset,
            )
        elif await self.master.bus_reset():
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

    # --- MDB link ---------------------------------------------------------------------------

    def _watch_link(self, master: object, port: str) -> None:
        if not isinstance(master, LinkReporting):
            self.mdb_link = {"state": "up", "detail": port}  # open() succeeded; no reports
            return
        self.mdb_link = {"state": "up" if master.link_up else "down", "detail": master.link_detail}
        master.add_link_listener(self._on_link)
        if not master.link_up:
            self._link_changed(False, master.link_detail)

    def _on_link(self, up: bool, detail: str) -> None:
        """The bus master's link changed (called on the loop)."""
        if self._shut_down:
            return
        was_up = self.mdb_link is None or self.mdb_link["state"] == "up"
        self.mdb_link = {"state": "up" if up else "down", "detail": detail}
        if up == was_up:
            # Still down, for a new reason (a reopening failed): no news for the operator.
            if up:
                log.debug("mdb link detail", detail=detail)
            else:
                self._mdb_link_log.failed("mdb link down", detail=detail)
            return
        self._link_changed(up, detail)

    def _link_changed(self, up: bool, detail: str) -> None:
        if up:
            self._mdb_link_log.recovered("mdb link up again", detail=detail)
        else:
            self._mdb_link_log.failed("mdb link down", detail=detail)
        if self.machine is not None:
            self.machine.set_fault(MDB_LINK_FAULT, None if up else f"MDB link down: {detail}")
            self.machine.hub.publish(
                {"event": "link", "state": "up" if up else "down", "detail": detail}
            )
        state = "recovered" if up else "offline"
        self.spawn("journal-mdb-link", self._journal_link(state, detail))

    async def _journal_link(self, state: str, detail: str) -> None:
        # A change while the journal is still opening is journaled once it is open; if it
        # never opens, the daemon stops and this task is cancelled with the others.
        await self._journal_open.wait()
        if self.journal is None:
            return
        try:
            await self.journal.append(
                "device", {"device": "mdb", "state": state, "detail": detail[:200]}
            )
        except VmcError as exc:
            log.warning("mdb link change not journaled", state=state, error=str(exc))

    def _control_state(self) -> dict[str, Any]:
        """What the control interface adds to the machine's STATE."""
        return {
            "mdb_link": dict(self.mdb_link) if self.mdb_link else None,
            "cloud_link": self._cloud_status(),
        }

    # --- cloud link -------------------------------------------------------------------------

    def _cloud_status(self) -> dict[str, Any] | None:
        status = self.cloud.status if self.cloud is not None else None
        return status.as_dict() if status is not None else None

    async def _start_cloud(self) -> None:
        if not self.config.cloud.enabled:
            return
        from vmc.cloud.wiring import CloudWiring

        journal, machine = self.journal, self.machine
        assert journal is not None and machine is not None
        self.cloud = CloudWiring(
            self.config,
            journal,
            machine,
            self.devices,
            motor_present=lambda: self.motor is not None,
            started_mono=self._started_mono,
            stopping=lambda: self._shut_down,
        )
        await self.cloud.start(self.spawn)

    async def _stop_cloud(self) -> None:
        if self.cloud is not None:
            await self.cloud.stop()

    # --- devices ----------------------------------------------------------------------------

    def _on_device_event(self, event: DeviceEvent) -> None:
        if not isinstance(event, StateChanged | StatusReported):
            # Money and what leads to it (coins, bills, levers, sessions): the stop waits for
            # the devices to be quiet of these.
            self._last_device_event = asyncio.get_running_loop().time()
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

    def _quiet_polls_while_idle(self, idle: bool) -> None:
        """Nobody at the machine: the devices' idle POLLs slow to ``mdb.idle_poll_interval_ms``;
        anyone at it: back to each device's own interval."""
        interval_ms = self.config.mdb.idle_poll_interval_ms
        slow = idle and interval_ms > 0 and not self._winding_down
        quiet_s = interval_ms / 1000.0 if slow else None
        for device in self.devices.values():
            device.set_quiet_poll_interval(quiet_s)

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
        machine.idle_listeners.append(self._quiet_polls_while_idle)
        # The devices run since _start_mdb: what they reported before the machine existed
        # (ready, while the motor board was still being opened) is given to it now.
        for device in self.devices.values():
            if device.state is not DeviceState.OFFLINE:
                machine.on_device_event(device.state_event("at start"))
        journal.on_health(lambda ok, reason: machine.set_fault("journal", None if ok else reason))
        if not journal.writable:
            machine.set_fault("journal", journal.health_reason or "journal not writable")
        if self.mdb_link is not None and self.mdb_link["state"] == "down":
            machine.set_fault(MDB_LINK_FAULT, f"MDB link down: {self.mdb_link['detail']}")
        self._vend_task = self.spawn("vend-cycle", machine.run())
        technician = Technician(
            self.config,
            machine,
            self.devices,
            cloud=lambda: self.cloud.link if self.cloud is not None else None,
        )
        self.control = ControlServer(
            Path(self.config.control.socket),
            machine,
            extra_state=self._control_state,
            technician=technician,
        )
        await self.control.start()
        if self.config.console.port is not None:
            # The serial console calls the control ops in-process (vmc/console/serial.py).
            self.spawn(
                "console-serial", SerialConsole(self.config.console, self.control.call).run()
            )
        facts = await self._device_facts()
        await machine.submit(lambda: machine.recover(facts))
        self.spawn("journal-prune", self._prune_daily())

    async def _until_accepting(self) -> None:
        """Wait (bounded) until every acceptor the machine wants on is enabled on the wire: the
        machine asks for it at once, a device applies it at its next POLL turn."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ACCEPTING_WAIT_S
        while True:
            waiting = [
                name
                for name, device in self.devices.items()
                if device.enabled_wanted
                and device.state is DeviceState.READY
                and not device.accepting
            ]
            if not waiting:
                return
            if loop.time() > deadline:
                log.warning("acceptors not enabled in time", devices=waiting)
                return
            await asyncio.sleep(ACCEPTING_CHECK_S)

    def _log_running(self) -> None:
        machine = self.machine
        assert machine is not None
        snapshot = machine.snapshot()
        accepting: dict[str, bool] = snapshot["accepting"]
        if snapshot["in_service"] and any(accepting.values()):
            log.info(
                "vmc running",
                accepting=accepting,
                credit=snapshot["credit"],
                mdb_link=(self.mdb_link or {}).get("state", ""),
            )
            return
        if snapshot["faults"]:
            why = "; ".join(f"{key}: {reason}" for key, reason in snapshot["faults"].items())
        elif not accepting:
            why = "no coin changer or bill validator configured"
        elif snapshot["credit"] >= snapshot["max_credit"]:
            why = "the credit is at the maximum"
        else:
            why = "no acceptor is ready: " + ", ".join(
                f"{name} {state}" for name, state in snapshot["devices"].items()
            )
        log.warning(
            "vmc running, not taking money",
            why=why,
            accepting=accepting,
            faults=snapshot["faults"],
            devices=snapshot["devices"],
        )

    def _start_service_reporting(self) -> None:
        assert self.journal is not None
        self.service = reporter_from_environment(self._service_status, self.journal, self.master)
        if self.service.enabled:
            self.service.ready()
            self.spawn("service-reporting", self.service.run())

    def _service_status(self) -> str:
        assert self.machine is not None
        status = self.cloud.status if self.cloud is not None else None
        return status_line(self.machine.snapshot(), status.state.value if status else None)

    async def _prune_daily(self) -> None:
        journal = self.journal
        assert journal is not None
        failing = FailureLog(log)
        while True:
            try:
                pruned = await journal.prune(_utc_now(), self.config.journal.retention_days)
                failing.recovered("journal prune works again")
                if pruned:
                    log.info("journal pruned", records=pruned)
            except VmcError as exc:
                failing.failed("journal prune failed", error=str(exc))
            await asyncio.sleep(PRUNE_INTERVAL_S)

    # --- run -------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._started_mono = loop.time()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            log.info("vmc starting", machine=self.config.machine.id, state_dir=str(self.state_dir))
            # The MDB line process (a Python start-up of its own) starts while the journal
            # opens: the first POLL comes that much sooner (bench/footprint.py).
            mdb_started = asyncio.create_task(self._start_mdb(), name="mdb-start")
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
            finally:
                if self.journal is None:
                    await _cancel_start(mdb_started)
            self._journal_open.set()
            stock = stock_levels(await self.journal.levels())
            await mdb_started
            await self._start_motor(stock)
            await self._start_machine()
            await self._start_cloud()
            dex_port = dex_port_task(self.config, self.journal)
            if dex_port is not None:  # [dex] port: the handheld's audit port (vmc/dex/)
                self.spawn("dex-port", dex_port)
            await self._until_accepting()
            self._log_running()
            self._start_service_reporting()
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
        """Wind down with the bus still open, close the control interface, cancel and await
        every task, then close the bus and the journal and stop the children."""
        if self.service is not None:
            self.service.stopping()
        await self._wind_down()
        await self._stop_cloud()
        if self.control is not None:
            await self.control.close()
            self.control = None
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
        self._shut_down = True
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
        if self.children:
            await asyncio.gather(*(_stop_child(child) for child in self.children))
        self.children.clear()
        if self.service is not None:
            self.service.close()

    async def _wind_down(self) -> None:
        """Stop taking money on the wire, then let what is in flight finish and be journaled:
        the vend cycle's current step, and what the devices report in their next POLLs."""
        if self.control is not None:
            self.control.refuse_requests("the daemon is stopping")
        if self.machine is not None:
            # The machine wants no money any more: nothing enables an acceptor again.
            self.machine.set_fault(STOPPING_FAULT, "the daemon is stopping")
        self._winding_down = True
        # What the devices still hold (a coin inserted just now) comes at their own cadence.
        self._quiet_polls_while_idle(False)
        if not self.devices and self.machine is None:
            return
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(WIND_DOWN_TIMEOUT_S):
                await self._acceptors_off()
                await self._until_quiet()
        except TimeoutError:
            log.warning(
                "stop: wind-down cut short",
                timeout_s=WIND_DOWN_TIMEOUT_S,
                phase=self.machine.phase.value if self.machine is not None else "",
            )
        else:
            log.info(
                "stop: acceptors off, devices quiet",
                seconds=round(asyncio.get_running_loop().time() - started, 3),
            )

    async def _acceptors_off(self) -> None:
        """Disable every acceptor and reader on the wire (and wait for each to take it)."""
        live = {
            name: device
            for name, device in self.devices.items()
            if device.state in (DeviceState.READY, DeviceState.FAULT)
        }
        for device in self.devices.values():
            device.set_enabled(False)  # and one that is starting up stays disabled
        if self.master is None or not live:
            return

        async def off(name: str, device: MdbDevice) -> None:
            try:
                await device.stop_accepting_now()
            except DriverError as exc:
                log.warning("stop: could not disable on the wire", device=name, error=str(exc))

        try:
            async with asyncio.timeout(ACCEPTORS_OFF_TIMEOUT_S):
                await asyncio.gather(*(off(name, device) for name, device in live.items()))
        except TimeoutError:
            log.warning("stop: disabling the acceptors took too long", devices=list(live))

    async def _until_quiet(self) -> None:
        """Let the machine finish its current step and the devices report what was in flight:
        quiet once no device reported anything for ``QUIET_POLLS`` of the slowest POLL interval
        and the machine has handled everything queued before (a job through its queue)."""
        loop = asyncio.get_running_loop()
        quiet_s = QUIET_POLLS * max(
            (device.autopoll_interval_s() for device in self.devices.values()), default=0.0
        )
        quiet_from = loop.time()
        while True:
            await self._machine_caught_up()
            last = max(quiet_from, self._last_device_event)
            left = last + quiet_s - loop.time()
            if left <= 0:
                return
            await asyncio.sleep(left)

    async def _machine_caught_up(self) -> None:
        machine = self.machine
        if machine is None or self._vend_task is None or self._vend_task.done():
            return
        await machine.submit(_nothing)


def _utc_now() -> datetime:
    return datetime.now(UTC)


async def _nothing() -> None:
    """A job for the vend cycle whose completion says every job queued before it is done."""


async def _cancel_start(task: asyncio.Task[None]) -> None:
    """Cancel a start-up step that is no longer wanted and wait for it; what it failed of
    does not matter any more (the step that failed first is the one reported)."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: asyncio would log it at exit otherwise


async def _stop_child(child: Child) -> None:
    with contextlib.suppress(ProcessLookupError):
        await child.stop()


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
