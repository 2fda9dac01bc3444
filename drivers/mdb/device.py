"""VMC-side device logic shared by every MDB peripheral class.

A device owns its state and its time: it brings the peripheral through the start-up sequence
(../shared/reference/mdb.md "Start-up of every device"), polls it at its cadence, notices when it
falls silent for longer than its non-response time, and starts it up again when it answers.
Subclasses (coin changer, bill validator, cashless reader) supply the device-specific steps:
``initialise`` (SETUP, EXPANSION ID, FEATURE ENABLE, ...), ``parse_poll`` and ``apply_enable``.

States change only through ``_set_state`` so every change is logged and reported once.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from drivers.errors import MdbError, NakReceived, NoResponse
from drivers.mdb.autopoll import AutopollBus, Polled
from drivers.mdb.block import COMMAND_MASK
from drivers.mdb.commands import ACK_ONLY, ACK_OR_DATA, CommandDef, ReplyShape
from drivers.mdb.master import MdbBus, Priority, Reply
from drivers.recurring import FailureLog

log = logging.getLogger("drivers.mdb.device")

#: Longest wait between a RESET and the first POLL. mdb.md "Cadence": real VMCs wait about
#: 500 ms (a cadence seen, not a requirement). The first POLL goes at the device's own POLL cadence
#: when that is shorter: a peripheral still busy with its reset does not answer, and
#: ``request`` sends the POLL again until the device's non-response time (mdb.md "Timing")
#: since the RESET was ACKed, so nothing is lost by asking early (the first POLL came 0.5 s
#: later otherwise: bench/footprint.py).
RESET_SETTLE_S = 0.5
#: How long start-up keeps polling for JUST RESET after RESET before giving up on this attempt.
JUST_RESET_WAIT_S = 2.0
#: Pause between start-up attempts of a device that does not answer (keeps the bus free).
OFFLINE_RETRY_S = 1.0
#: Longest pause before a command that got no answer is sent again (each send already made
#: its own attempts, ~50 ms); the device's poll interval when that is shorter.
COMMAND_RETRY_PAUSE_S = 0.1


class DeviceState(enum.Enum):
    OFFLINE = "offline"  # not answering (or never seen)
    STARTING = "starting"  # RESET sent, start-up sequence running
    READY = "ready"  # started up; polled; may be enabled or disabled
    FAULT = "fault"  # answering but reporting a fault that stops it working


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """Base of everything a device reports upwards. ``device`` is the device's name."""

    device: str


@dataclass(frozen=True, slots=True)
class StateChanged(DeviceEvent):
    state: DeviceState
    detail: str = ""
    #: What start-up learned, on the change to READY (a copy: later start-ups do not alter it).
    info: DeviceInfo | None = None


@dataclass(frozen=True, slots=True)
class JustReset(DeviceEvent):
    """The peripheral reports it has reset (it forgot its set-up: redo start-up)."""


@dataclass(frozen=True, slots=True)
class StatusReported(DeviceEvent):
    """A status item from a POLL reply that is not money (jam, busy, disabled, ...)."""

    code: int
    text: str
    fault: bool = False


@dataclass(slots=True)
class DeviceInfo:
    """What start-up learned; subclasses fill ``details`` (level, scaling, coin values, ...)."""

    level: int = 0
    manufacturer: str = ""
    serial: str = ""
    model: str = ""
    version: int = 0
    details: dict[str, object] = field(default_factory=dict)


EventSink = Callable[[DeviceEvent], None]
Clock = Callable[[], float]


class MdbDevice(abc.ABC):
    """One MDB peripheral as seen from the VMC.

    ``run()`` is the device's supervisor loop; cancel it to stop. Commands from the vend cycle
    (``dispense``, ``escrow`` ...) are subclass methods that go through ``request`` and so
    share the one bus with the polling.
    """

    NAME: ClassVar[str]
    ADDRESS: ClassVar[int]
    #: Command offsets common to every device class (MDB 4.2 §5, §6, §7: RESET is cmd 0).
    RESET_CMD: ClassVar[int] = 0x00
    POLL_CMD: ClassVar[int]
    #: Non-response time: silent longer than this, the device counts as gone (mdb.md
    #: "Timing"). Until then a command that got no answer is sent again.
    NON_RESPONSE_S: ClassVar[float]
    #: The shape of a valid POLL answer (ACK, or the device's activity items).
    POLL_REPLY: ClassVar[ReplyShape] = ACK_OR_DATA

    def __init__(
        self,
        master: MdbBus,
        *,
        poll_interval_s: float,
        on_event: EventSink,
        clock: Clock = time.monotonic,
    ) -> None:
        self.master = master
        self.poll_interval_s = poll_interval_s
        #: A longer interval for the autopolled POLLs while the machine has nobody at it
        #: (``set_quiet_poll_interval``); None: the device's own interval always.
        self._quiet_poll_interval_s: float | None = None
        self._on_event = on_event
        self._clock = clock
        self.state = DeviceState.OFFLINE
        self.info = DeviceInfo()
        self.enabled_wanted = False
        self._enabled_applied: bool | None = None
        self._last_answer = clock()
        self._offline_log = FailureLog(log)
        #: The master when it can run this device's idle POLLs in its line (autopoll).
        self._autopoll_bus = master if isinstance(master, AutopollBus) else None
        #: Set when something the supervisor may have to act on without a POLL changed.
        self._nudged = asyncio.Event()

    # --- for subclasses ------------------------------------------------------------------

    @abc.abstractmethod
    async def initialise(self) -> None:
        """Everything after JUST RESET up to (not including) enable: SETUP, EXPANSION ID, ..."""

    @abc.abstractmethod
    def parse_poll(self, data: bytes) -> list[DeviceEvent]:
        """Decode a POLL data reply into events. Must return a ``JustReset`` for JUST RESET."""

    @abc.abstractmethod
    async def apply_enable(self, enabled: bool) -> None:
        """Send the command that enables or disables accepting (COIN TYPE, BILL TYPE, READER)."""

    async def after_poll(self) -> None:  # noqa: B027 - optional hook
        """Called after every successful POLL (e.g. TUBE STATUS refresh after deposits), and
        after every turn the supervisor takes without one while autopolled."""

    def handle_poll_reply(self, reply: Reply) -> list[DeviceEvent]:
        """What a POLL's answer (a bare ACK too) means: its events. Subclasses that track
        something from every POLL extend this."""
        return self.parse_poll(reply.data) if reply.data else []

    def needs_every_poll(self) -> bool:
        """True while a bare ACK to POLL would change something here (a standing status it
        clears, a refresh it lets go): the supervisor then sends its POLLs itself instead of
        having them autopolled, whose bare ACKs it never sees."""
        return False

    def turn_in_s(self) -> float | None:
        """While autopolled: seconds until the supervisor must take a turn (enable, reset,
        ``after_poll``) without a POLL result; 0 now, None only when a POLL result comes.
        Rechecked whenever ``nudge`` is called."""
        if self.state not in (DeviceState.READY, DeviceState.FAULT):
            return 0.0
        if self._enabled_applied is not self.enabled_wanted or self.needs_every_poll():
            return 0.0
        return None

    def nudge(self) -> None:
        """Something ``turn_in_s`` looks at may have changed: have the supervisor look."""
        self._nudged.set()

    def set_quiet_poll_interval(self, interval_s: float | None) -> None:
        """Autopoll every ``interval_s`` (when longer than the device's own interval) while
        its owner says nothing is going on, or at the device's own interval again (None).

        Only the line's idle POLLs slow down: while the device drives its own POLLs (after any
        activity, ``needs_every_poll``) it keeps its own interval. An armed POLL is re-armed
        at the new interval at once (docs/autopoll.md)."""
        if interval_s != self._quiet_poll_interval_s:
            self._quiet_poll_interval_s = interval_s
            self.nudge()

    def autopoll_interval_s(self) -> float:
        """The interval the line's idle POLLs of this device go at now."""
        quiet = self._quiet_poll_interval_s
        return self.poll_interval_s if quiet is None else max(self.poll_interval_s, quiet)

    # --- shared mechanics ----------------------------------------------------------------

    def emit(self, event: DeviceEvent) -> None:
        self._on_event(event)

    async def request(
        self,
        command: int,
        data: bytes = b"",
        *,
        priority: Priority = Priority.COMMAND,
        max_attempts: int | None = None,
        expect: ReplyShape = ACK_OR_DATA,
    ) -> Reply:
        """One exchange with this device; marks it alive when it answers.

        A device counts as gone only after its non-response time (mdb.md "Timing"), not after
        one command's few attempts: a command that may be repeated (``max_attempts`` not
        given) is sent again until it is answered or the device has been silent that long
        (since its last answer, or since this object was made for one never heard).
        A command that must not be repeated blindly (``max_attempts`` given: a payout, an
        escrow) fails at once, and its caller finds out what happened by other means.
        """
        while True:
            try:
                reply = await self.master.request(
                    self.ADDRESS | command,
                    data,
                    priority=priority,
                    max_attempts=max_attempts,
                    expect=expect,
                )
            except (NoResponse, NakReceived) as exc:
                silent_for = self._clock() - self._last_answer
                if max_attempts is not None or silent_for >= self.NON_RESPONSE_S:
                    raise
                log.debug("%s: %s; sending again", self.NAME, exc)
                await asyncio.sleep(min(self.poll_interval_s, COMMAND_RETRY_PAUSE_S))
                continue
            self._last_answer = self._clock()
            # A command from outside the supervisor loop may change what it must do next.
            self.nudge()
            return reply

    @property
    def accepting(self) -> bool:
        """The device was last told to accept (enable applied), and is started up."""
        return self.state is DeviceState.READY and self._enabled_applied is True

    async def send(
        self,
        command: CommandDef,
        payload: bytes = b"",
        *,
        priority: Priority = Priority.COMMAND,
        max_attempts: int | None = None,
    ) -> Reply:
        """One command from the device's table (sub-command and length checked by it)."""
        addr_cmd, data = command.request(self.ADDRESS, payload)
        return await self.request(
            addr_cmd & COMMAND_MASK,
            data,
            priority=priority,
            max_attempts=max_attempts,
            expect=command.reply,
        )

    def set_enabled(self, enabled: bool) -> None:
        """Ask for accepting on/off; applied by the supervisor loop at its next turn."""
        self.enabled_wanted = enabled
        self.nudge()

    def request_reset(self, why: str) -> None:
        """Start the device up again (RESET and its start-up sequence) at the supervisor's next
        turn, as after a JUST RESET: a technician's reset. The caller decides when that is
        safe (no payout or escrow in progress)."""
        if self.state in (DeviceState.READY, DeviceState.FAULT):
            self._set_state(DeviceState.STARTING, why)

    def _set_state(self, state: DeviceState, detail: str = "") -> None:
        if state is self.state:
            return
        log.info("%s: %s -> %s %s", self.NAME, self.state.value, state.value, detail)
        self.state = state
        self.nudge()
        self.emit(self.state_event(detail))

    def state_event(self, detail: str = "") -> StateChanged:
        """The device's current state as an event; when READY, with what start-up learned."""
        info = None
        if self.state is DeviceState.READY:
            info = dataclasses.replace(self.info, details=dict(self.info.details))
        return StateChanged(self.NAME, self.state, detail, info)

    async def start_up(self) -> None:
        """RESET, POLL until JUST RESET, then the device's own initialisation and enable. The
        line may have done the first half before the daemon was up (``_started_early``)."""
        if not await self._started_early():
            await self._reset_until_just_reset()
        await self.initialise()
        self._enabled_applied = None
        await self._apply_wanted_enable()
        self._set_state(DeviceState.READY)

    async def _reset_until_just_reset(self) -> None:
        await self.request(self.RESET_CMD, priority=Priority.RESET, expect=ACK_ONLY)
        # Announced once the device answers: an absent device stays OFFLINE while it is
        # retried, instead of flapping OFFLINE -> STARTING -> OFFLINE every retry.
        self._set_state(DeviceState.STARTING)
        await asyncio.sleep(min(self.poll_interval_s, RESET_SETTLE_S))
        deadline = self._clock() + JUST_RESET_WAIT_S
        while True:
            reply = await self.poll_request()
            if reply.data and any(isinstance(e, JustReset) for e in self.parse_poll(reply.data)):
                return
            if self._clock() > deadline:
                # Some peripherals do not report JUST RESET to a RESET command; go on.
                log.warning("%s: no JUST RESET after RESET; continuing start-up", self.NAME)
                return
            await asyncio.sleep(self.poll_interval_s)

    async def _started_early(self) -> bool:
        """True when the line process RESET this device before the daemon was up and the
        POLLs it has sent since brought JUST RESET (drivers/mdb/line_spawn.py): start-up goes
        on from there. Anything else (no JUST RESET in time, an error, another answer) and the
        device is started up from its own RESET, as always."""
        bus = self._autopoll_bus
        if bus is None or not bus.take_early_reset(self.ADDRESS):
            return False
        self._set_state(DeviceState.STARTING)
        polled: Polled | None = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(JUST_RESET_WAIT_S):
                polled = await bus.next_polled(self.ADDRESS)
        if polled is None:
            await bus.autopoll(self.ADDRESS | self.POLL_CMD, None)
            polled = bus.take_polled(self.ADDRESS)
        result = polled.result if polled is not None else None
        if (
            isinstance(result, Reply)
            and result.data
            and any(isinstance(e, JustReset) for e in self.parse_poll(result.data))
        ):
            self._last_answer = self._clock()
            log.info("%s: JUST RESET after the line's early RESET", self.NAME)
            return True
        log.info("%s: no JUST RESET after the line's early RESET; resetting it", self.NAME)
        return False

    async def stop_accepting_now(self) -> None:
        """Switch accepting off on the wire now, not at the supervisor's next turn, and return
        once the peripheral has taken the command (raises MdbError if it did not)."""
        self.enabled_wanted = False
        await self.apply_enable(False)
        self._enabled_applied = False

    async def _apply_wanted_enable(self) -> None:
        if self._enabled_applied is not self.enabled_wanted:
            wanted = self.enabled_wanted
            await self.apply_enable(wanted)
            self._enabled_applied = wanted

    async def poll_request(self) -> Reply:
        """One POLL exchange. Every data reply the master ACKed is new activity: byte-identical
        replies in a row are separate events (mdb.md "Wire"); only a device fact can prove a
        repeat, and that is the device class's call in ``parse_poll``."""
        return await self.request(self.POLL_CMD, priority=Priority.POLL, expect=self.POLL_REPLY)

    async def poll_once(self) -> list[DeviceEvent]:
        return self.handle_poll_reply(await self.poll_request())

    async def _next_poll_events(self) -> list[DeviceEvent]:
        """The supervisor's next POLL result as events: its own POLL, or the line's autopoll
        (an empty list also when a turn is due without one)."""
        bus = self._autopoll_bus
        if bus is None or self.needs_every_poll():
            return await self.poll_once()
        reply = await self._autopolled(bus)
        return [] if reply is None else self.handle_poll_reply(reply)

    def _will_autopoll(self) -> bool:
        return self._autopoll_bus is not None and not self.needs_every_poll()

    async def _autopolled(self, bus: AutopollBus) -> Reply | None:
        """Arm this device's POLL in the line, wait for its first result that is not a bare
        ACK, or for a turn due without one (then disarm, and take a result that came
        meanwhile). The line suspends the POLL after each result it sends up."""
        addr_cmd = self.ADDRESS | self.POLL_CMD
        every_s = self.autopoll_interval_s()
        await bus.autopoll(addr_cmd, every_s, self.POLL_REPLY)
        try:
            polled = await self._wait_polled_or_turn(bus, every_s)
        except BaseException:
            # Cancelled (the daemon stops): hand the POLLs back so none is ACKed unheard.
            with contextlib.suppress(MdbError):
                await bus.autopoll(addr_cmd, None)
            raise
        if polled is None:
            await bus.autopoll(addr_cmd, None)
            polled = bus.take_polled(self.ADDRESS)
            if polled is None:
                return None
        return await self._polled_reply(polled)

    async def _wait_polled_or_turn(self, bus: AutopollBus, armed_every_s: float) -> Polled | None:
        while True:
            self._nudged.clear()
            if self.autopoll_interval_s() != armed_every_s:
                return None  # a turn to arm the POLL again at its new interval
            turn_in_s = self.turn_in_s()
            if turn_in_s is not None and turn_in_s <= 0:
                return None
            polled = bus.take_polled(self.ADDRESS)
            if polled is not None:
                return polled
            getter = asyncio.ensure_future(bus.next_polled(self.ADDRESS))
            nudged = asyncio.ensure_future(self._nudged.wait())
            try:
                done, _ = await asyncio.wait(
                    (getter, nudged), timeout=turn_in_s, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                nudged.cancel()
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                return getter.result()
            if not done:
                return None  # the turn ``turn_in_s`` asked for

    async def _polled_reply(self, polled: Polled) -> Reply:
        """An autopoll result taken as ``poll_request`` takes its own: the device's last
        answer from the line's (bare ACKs are not sent up), and an unanswered POLL sent again
        by the supervisor until the device has been silent its non-response time."""
        if polled.last_answer_ns > 0:
            # CLOCK_MONOTONIC in the line process; ``_clock`` may be another clock (tests):
            # carry the answer's age over, not the stamp.
            age_s = (time.monotonic_ns() - polled.last_answer_ns) / 1e9
            self._last_answer = max(self._last_answer, self._clock() - age_s)
        result = polled.result
        if isinstance(result, Reply):
            self._last_answer = self._clock()
            return result
        silent_for = self._clock() - self._last_answer
        if not isinstance(result, (NoResponse, NakReceived)) or silent_for >= self.NON_RESPONSE_S:
            raise result
        log.debug("%s: %s; sending POLL again", self.NAME, result)
        await asyncio.sleep(min(self.poll_interval_s, COMMAND_RETRY_PAUSE_S))
        return await self.poll_request()

    async def run(self) -> None:
        """Supervisor loop: start up, poll at cadence, drop to OFFLINE when silent, restart."""
        while True:
            try:
                if self.state in (DeviceState.OFFLINE, DeviceState.STARTING):
                    await self.start_up()
                    self._offline_log.recovered(f"{self.NAME}: answers again", device=self.NAME)
                    continue
                events = await self._next_poll_events()
                restart = False
                for event in events:
                    if isinstance(event, JustReset):
                        restart = True
                    else:
                        self.emit(event)
                if restart:
                    log.warning("%s: JUST RESET while running; starting up again", self.NAME)
                    self.emit(JustReset(self.NAME))
                    self._set_state(DeviceState.STARTING, "peripheral reset itself")
                    continue
                await self._apply_wanted_enable()
                await self.after_poll()
                if not self._will_autopoll():
                    await asyncio.sleep(self.poll_interval_s)  # an autopoll waits in the line
            except MdbError as exc:
                silent_for = self._clock() - self._last_answer
                alive = self.state in (DeviceState.READY, DeviceState.FAULT)
                if alive and silent_for < self.NON_RESPONSE_S:
                    log.debug("%s: %s (silent %.2f s)", self.NAME, exc, silent_for)
                    await asyncio.sleep(self.poll_interval_s)
                    continue
                first = self._offline_log.failed(
                    f"{self.NAME}: offline", device=self.NAME, error=str(exc)
                )
                if first and self.state is DeviceState.OFFLINE:
                    # Absent from the start: say so once.
                    self.emit(StateChanged(self.NAME, DeviceState.OFFLINE, str(exc)))
                self._set_state(DeviceState.OFFLINE, str(exc))
                await asyncio.sleep(OFFLINE_RETRY_S)
