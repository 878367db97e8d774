"""pandas-ta indicator names and parameters → canonical output names and kernels.

An instance row names a pandas-ta indicator and gives its parameters as text. The
common indicators below run incrementally (see kernels.py) when their parameters are
ones TA-Lib can reproduce; anything else pandas-ta knows runs through pandas-ta on a
window (slow.py). Parameters are normalised by the type of pandas-ta's default, so
`lower_std=2` and `lower_std=2.0` give the one name `BBL_20_2.0_2.0`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from indicators.kernels import (
    SOURCES,
    AdxKernel,
    BbandsKernel,
    DonchianKernel,
    HlcKernel,
    KcKernel,
    Kernel,
    MacdKernel,
    MfiKernel,
    ObvKernel,
    SarKernel,
    SourceKernel,
    StochKernel,
    StochRsiKernel,
    SupertrendKernel,
    VwapKernel,
)

# Bars of history after which a seeding difference has decayed below 1e-12 of itself:
# exp(-28) ≈ 7e-13 after 28 time constants.
DECAY_CONSTANTS = 28


class IndicatorConfigError(ValueError):
    """An instance that cannot run: unknown indicator, bad or missing parameter."""


# Bounds on every numeric parameter: TA-Lib refuses periods over 100,000 and an absurd
# value (1e300) would overflow or allocate without end. No indicator a trader runs on
# M1-M15 bars needs a period beyond 10,000 bars, nor a multiplier beyond a million.
MAX_PERIOD = 10_000
MAX_NUMBER = 1e6


@dataclass(frozen=True)
class Param:
    kind: str  # "int" | "float" | "number" (int when integral) | "str"
    default: Any
    minimum: float | None = None
    maximum: float | None = None

    def parse(self, name: str, text: str) -> Any:
        text = text.strip()
        try:
            if self.kind == "str":
                if not text or len(text) > 100:
                    raise ValueError
                return text
            number = float(text)
        except ValueError:
            raise IndicatorConfigError(f"parameter {name}={text!r} is not a valid {self.kind}") from None
        if not math.isfinite(number):
            raise IndicatorConfigError(f"parameter {name}={text!r} is not finite")
        if self.minimum is not None and number < self.minimum:
            raise IndicatorConfigError(f"parameter {name}={text!r} must be at least {self.minimum:g}")
        maximum = self.maximum if self.maximum is not None else MAX_PERIOD if self.kind == "int" else MAX_NUMBER
        if number > maximum:
            raise IndicatorConfigError(f"parameter {name}={text!r} must be at most {maximum:g}")
        if self.kind == "int":
            if not number.is_integer():
                raise IndicatorConfigError(f"parameter {name}={text!r} must be a whole number")
            return int(number)
        if self.kind == "number" and number.is_integer():
            return int(number)
        return number


def fmt(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def length(default: int) -> Param:
    return Param("int", default, 1)


def period(default: int) -> Param:
    return Param("int", default, 2)


@dataclass(frozen=True)
class IndicatorSpec:
    params: Mapping[str, Param]
    names: Callable[[dict[str, Any]], tuple[str, ...]]
    kernel: Callable[[tuple[str, ...], dict[str, Any]], Kernel]
    history: Callable[[dict[str, Any], int], int]  # (params, timeframe minutes) -> bars
    # Parameters pandas-ta accepts that TA-Lib can only reproduce at these values.
    fixed: Mapping[str, Any] = field(default_factory=dict)
    source: bool = False  # takes a `source` price (close by default)


def ema_bars(n: float) -> int:
    return math.ceil(DECAY_CONSTANTS * (n + 1) / 2)


def wilder_bars(n: float) -> int:
    return math.ceil(DECAY_CONSTANTS * n)


def _window(*keys: str) -> Callable[[dict[str, Any], int], int]:
    return lambda p, _tf: sum(int(p[k]) for k in keys) + 1


def _names(template: str, *parts: str) -> Callable[[dict[str, Any]], tuple[str, ...]]:
    """`template` holds one `{}` per output prefix; parts are the prefixes."""
    return lambda p: tuple(template.format(prefix, **{k: fmt(v) for k, v in p.items()}) for prefix in parts)


def _one(template: str) -> Callable[[dict[str, Any]], tuple[str, ...]]:
    return lambda p: (template.format(**{k: fmt(v) for k, v in p.items()}),)


SCALAR = Param("number", 100)

COMMON: dict[str, IndicatorSpec] = {
    "ema": IndicatorSpec(
        {"length": length(10)},
        _one("EMA_{length}"),
        lambda n, p: SourceKernel(n[0], "EMA", p["source"], timeperiod=p["length"]),
        lambda p, _tf: ema_bars(p["length"]) + p["length"],
        {"presma": True},
        source=True,
    ),
    "sma": IndicatorSpec(
        {"length": length(10)},
        _one("SMA_{length}"),
        lambda n, p: SourceKernel(n[0], "SMA", p["source"], timeperiod=p["length"]),
        _window("length"),
        source=True,
    ),
    "wma": IndicatorSpec(
        {"length": length(10)},
        _one("WMA_{length}"),
        lambda n, p: SourceKernel(n[0], "WMA", p["source"], timeperiod=p["length"]),
        _window("length"),
        {"asc": True},
        source=True,
    ),
    "rsi": IndicatorSpec(
        {"length": period(14), "scalar": SCALAR},
        _one("RSI_{length}"),
        lambda n, p: SourceKernel(n[0], "RSI", p["source"], p["scalar"] / 100, timeperiod=p["length"]),
        lambda p, _tf: wilder_bars(p["length"]) + p["length"],
        {"drift": 1, "mamode": "rma"},
        source=True,
    ),
    "roc": IndicatorSpec(
        {"length": length(10), "scalar": SCALAR},
        _one("ROC_{length}"),
        lambda n, p: SourceKernel(n[0], "ROC", p["source"], p["scalar"] / 100, timeperiod=p["length"]),
        _window("length"),
        source=True,
    ),
    "macd": IndicatorSpec(
        {"fast": period(12), "slow": period(26), "signal": length(9)},
        _names("MACD{}_{fast}_{slow}_{signal}", "", "h", "s"),
        lambda n, p: MacdKernel(n, p["fast"], p["slow"], p["signal"]),
        lambda p, _tf: ema_bars(max(p["fast"], p["slow"])) + ema_bars(p["signal"]) + p["slow"] + p["signal"],
    ),
    "bbands": IndicatorSpec(
        {"length": period(5), "lower_std": Param("float", 2.0, 0), "upper_std": Param("float", 2.0, 0)},
        _names("BB{}_{length}_{lower_std}_{upper_std}", "L", "M", "U", "B", "P"),
        lambda n, p: BbandsKernel(n, p["length"], p["lower_std"], p["upper_std"]),
        _window("length"),
        {"ddof": 0, "mamode": "sma"},
    ),
    "atr": IndicatorSpec(
        {"length": length(14)},
        _one("ATRr_{length}"),
        lambda n, p: HlcKernel(n[0], "ATR", timeperiod=p["length"]),
        lambda p, _tf: wilder_bars(p["length"]) + p["length"],
        {"mamode": "rma", "drift": 1, "percent": False},
    ),
    "natr": IndicatorSpec(
        {"length": length(14), "scalar": SCALAR},
        _one("NATR_{length}"),
        lambda n, p: HlcKernel(n[0], "NATR", p["scalar"] / 100, timeperiod=p["length"]),
        lambda p, _tf: wilder_bars(p["length"]) + p["length"],
        {"mamode": "rma", "drift": 1},
    ),
    "adx": IndicatorSpec(
        {"length": period(14), "adxr_length": length(2)},
        lambda p: (
            f"ADX_{p['length']}",
            f"ADXR_{p['length']}_{p['adxr_length']}",
            f"DMP_{p['length']}",
            f"DMN_{p['length']}",
        ),
        lambda n, p: AdxKernel(n, p["length"], p["adxr_length"]),
        lambda p, _tf: 2 * wilder_bars(p["length"]) + 2 * p["length"] + p["adxr_length"],
        {"scalar": 100, "mamode": "rma", "drift": 1, "tvmode": False},
    ),
    "stoch": IndicatorSpec(
        {"k": length(14), "d": length(3), "smooth_k": length(3)},
        _names("STOCH{}_{k}_{d}_{smooth_k}", "k", "d", "h"),
        lambda n, p: StochKernel(n, p["k"], p["d"], p["smooth_k"]),
        _window("k", "d", "smooth_k"),
        {"mamode": "sma"},
    ),
    "stochrsi": IndicatorSpec(
        {"length": length(14), "rsi_length": period(14), "k": length(3), "d": length(3)},
        _names("STOCHRSI{}_{length}_{rsi_length}_{k}_{d}", "k", "d"),
        lambda n, p: StochRsiKernel(n, p["length"], p["rsi_length"], p["k"], p["d"]),
        lambda p, _tf: wilder_bars(p["rsi_length"]) + p["rsi_length"] + p["length"] + p["k"] + p["d"],
        {"mamode": "sma"},
    ),
    "cci": IndicatorSpec(
        {"length": period(14), "c": Param("float", 0.015, 1e-12)},
        _one("CCI_{length}_{c}"),
        lambda n, p: HlcKernel(n[0], "CCI", 0.015 / p["c"], timeperiod=p["length"]),
        _window("length"),
    ),
    "mfi": IndicatorSpec(
        {"length": period(14)},
        _one("MFI_{length}"),
        lambda n, p: MfiKernel(n[0], p["length"]),
        _window("length"),
        {"drift": 1},
    ),
    "willr": IndicatorSpec(
        {"length": period(14)},
        _one("WILLR_{length}"),
        lambda n, p: HlcKernel(n[0], "WILLR", timeperiod=p["length"]),
        _window("length"),
    ),
    "obv": IndicatorSpec({}, lambda p: ("OBV",), lambda n, p: ObvKernel(n[0]), lambda p, _tf: 2),
    "psar": IndicatorSpec(
        {
            "af0": Param("float", 0.02, 0, 1),
            "af": Param("float", 0.02, 0, 1),
            "max_af": Param("float", 0.2, 0, 1),
        },
        _names("PSAR{}_{af0}_{max_af}", "l", "s"),
        lambda n, p: SarKernel(n, p["af0"], p["max_af"]),
        lambda p, _tf: 1000,  # path-dependent; settles after a few reversals
    ),
    "supertrend": IndicatorSpec(
        {"length": period(7), "multiplier": Param("float", 3.0, 0)},
        _names("SUPERT{}_{length}_{multiplier}", "", "d", "l", "s"),
        lambda n, p: SupertrendKernel(n, p["length"], p["multiplier"]),
        lambda p, _tf: wilder_bars(p["length"]) + 1000,  # ATR decay, then the sticky bands
        {"atr_mamode": "rma"},
    ),
    "kc": IndicatorSpec(
        {"length": period(20), "scalar": Param("number", 2, 0)},
        _names("KC{}e_{length}_{scalar}", "L", "B", "U"),
        lambda n, p: KcKernel(n, p["length"], float(p["scalar"])),
        lambda p, _tf: max(ema_bars(p["length"]), wilder_bars(p["length"])) + p["length"],
        {"mamode": "ema", "tr": True},
    ),
    "donchian": IndicatorSpec(
        {"lower_length": length(20), "upper_length": length(20)},
        _names("DC{}_{lower_length}_{upper_length}", "L", "M", "U"),
        lambda n, p: DonchianKernel(n, p["lower_length"], p["upper_length"]),
        _window("lower_length", "upper_length"),
    ),
    "vwap": IndicatorSpec(
        {"anchor": Param("str", "D")},
        _one("VWAP_{anchor}"),
        lambda n, p: VwapKernel(n[0]),
        lambda p, tf_minutes: 1440 // tf_minutes + 1,
    ),
}

# pandas-ta computes supertrend's ATR over `atr_length` (default: length); TA-Lib over length.
_SAME_AS = {"supertrend": {"atr_length": "length"}, "adx": {"signal_length": "length"}}
_ALLOWED_VALUES = {"vwap": {"anchor": {"D"}}}


@dataclass(frozen=True)
class Instance:
    """A configured indicator, ready to run on every ticker of its timeframe."""

    id: int
    indicator: str
    tf: str
    params: dict[str, Any]
    names: tuple[str, ...]
    history: int  # bars to open from so that values match the whole history within 1e-12

    @property
    def anchored(self) -> bool:
        """A running sum from the first bar: it continues from a stored value."""
        return self.indicator == "obv"

    def make_kernel(self) -> Kernel:
        return COMMON[self.indicator].kernel(self.names, self.params)


def _parse_bool(text: str) -> bool | None:
    return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.strip().lower())


def _matches(expected: Any, text: str) -> bool:
    if isinstance(expected, bool):
        return _parse_bool(text) is expected
    if isinstance(expected, int | float):
        try:
            return float(text) == float(expected)
        except ValueError:
            return False
    return text.strip().lower() == str(expected).lower()


def parse_common(instance_id: int, indicator: str, tf: str, tf_minutes: int, raw: Mapping[str, str]) -> Instance | None:
    """The incremental form of this instance, or None when only pandas-ta can compute it
    (an indicator or a parameter TA-Lib cannot reproduce). Raises IndicatorConfigError
    for a value that is invalid whichever way it runs."""
    spec = COMMON.get(indicator)
    if spec is None:
        return None
    params: dict[str, Any] = {}
    for name, param in spec.params.items():
        params[name] = param.parse(name, raw[name]) if name in raw else param.default
    source = raw.get("source", raw.get("close", "close")).strip().lower() if spec.source else "close"
    if spec.source:
        if source not in SOURCES:
            raise IndicatorConfigError(f"source={source!r} is not one of {', '.join(SOURCES)}")
        params["source"] = source
    for name, text in raw.items():
        if name in spec.params or (spec.source and name in ("source", "close")):
            continue
        same_as = _SAME_AS.get(indicator, {}).get(name)
        if same_as and _matches(params[same_as], text):
            continue
        if name in spec.fixed and _matches(spec.fixed[name], text):
            continue
        return None  # a pandas-ta parameter the incremental form does not reproduce
    for name, allowed in _ALLOWED_VALUES.get(indicator, {}).items():
        if params[name] not in allowed:
            return None
    if indicator == "psar" and params["af"] != params["af0"]:
        return None  # TA-Lib SAR has one acceleration for the start and the step
    if indicator == "donchian" and min(params["lower_length"], params["upper_length"]) < 2:
        return None  # TA-Lib MIN/MAX refuse a period of 1 (TA_BAD_PARAM); pandas-ta takes it
    if indicator == "macd" and params["fast"] >= params["slow"]:
        raise IndicatorConfigError(f"fast={params['fast']} must be below slow={params['slow']}")
    names = spec.names(params)
    if spec.source and source != "close":
        names = tuple(f"{source.upper()}_{n}" for n in names)
    history = spec.history(params, tf_minutes)
    return Instance(instance_id, indicator, tf, params, names, history)
