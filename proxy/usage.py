"""Usage and cost: the prices admins set, each job's cost, a user's totals per day or month.

Money is integer micro-units of the currency everywhere it is stored or summed
(prices per hour and job costs): sums are exact on SQLite and PostgreSQL alike,
so the total of a user's month is exactly the sum of its jobs' costs. Decimal
strings ("0.012345") are what the API and the pages show.

Memory is billed on the memory a job reserved (memory_mb x wall time), not on
its peak: the reservation is what the dispatcher holds for the job on a
worker, so no other job can use it for that time, and it is a number the user
chose up front and can predict; the peak is a sample the sandbox may not even
report. GB means GiB here (1024 MiB), the unit memory_mb is given in.

A job's cost is fixed once, when it reaches a final state, with the prices in
force then (`record_cost`); later price changes never rewrite it. Days and
months are UTC.
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

from .errors import ValidationError
from .models import FINAL_VALUES, iso

MICROS = 1_000_000
# An hourly price above a million units is a typo, not a price.
MAX_PRICE_MICROS = 10**6 * MICROS
DEFAULT_CURRENCY = "USD"
PRICE_FIELDS = ("cpu_hour", "gb_hour", "gpu_hour")
# The longest span one /usage answer covers: bounds the rows read per request.
MAX_DAYS = 366
MAX_MONTHS = 36
PERIODS = ("day", "month")
MIN_YEAR, MAX_YEAR = 1971, 9998
# What a try reports that is billed (memory is billed on memory_mb x wall time).
TRY_USAGE = ("cpu_seconds", "wall_seconds", "gpu_seconds")


@dataclass(frozen=True)
class Prices:
    currency: str
    cpu_hour_micros: int
    gb_hour_micros: int
    gpu_hour_micros: int
    updated_at: float | None = None
    updated_by: str | None = None


# ---------------------------------------------------------------------- prices

def get_prices(conn) -> Prices:
    """The prices in force; zero in DEFAULT_CURRENCY until an admin sets some."""
    row = conn.query_one("SELECT * FROM prices WHERE id = 1")
    if row is None:
        return Prices(DEFAULT_CURRENCY, 0, 0, 0)
    return Prices(row["currency"], row["cpu_hour_micros"], row["gb_hour_micros"],
                  row["gpu_hour_micros"], row["updated_at"], row["updated_by"])


def set_prices(conn, changes: dict, admin_name: str, now: float | None = None) -> Prices:
    """Change some of the prices (fields cpu_hour, gb_hour, gpu_hour, currency).

    Prices are decimal strings or JSON numbers with at most six decimals.

    Raises:
        ValidationError: an unknown field, a negative or malformed price, a bad currency.
    """
    if not isinstance(changes, dict):
        raise ValidationError("send a JSON object of prices", code="invalid_prices")
    unknown = sorted(set(changes) - {*PRICE_FIELDS, "currency"})
    if unknown:
        raise ValidationError(f"unknown price field(s) {', '.join(unknown)}; known: currency, "
                              f"{', '.join(PRICE_FIELDS)}", code="invalid_prices")
    now = time.time() if now is None else now
    values = {f"{f}_micros": parse_price(f, changes[f]) for f in PRICE_FIELDS if f in changes}
    if "currency" in changes:
        values["currency"] = _currency(changes["currency"])
    values.update(updated_at=now, updated_by=admin_name)
    # One statement writes only the columns sent, so two admins changing different
    # prices at the same moment both keep their change; nothing is read first.
    # The first change ever also fills in the defaults for the rest.
    row = dict({"currency": DEFAULT_CURRENCY, **{f"{f}_micros": 0 for f in PRICE_FIELDS}}, **values)
    with conn.transaction():
        conn.execute(
            f"INSERT INTO prices (id, {', '.join(row)}) VALUES (1, {', '.join('?' for _ in row)})"
            " ON CONFLICT (id) DO UPDATE SET "
            + ", ".join(f"{column} = excluded.{column}" for column in values),
            tuple(row.values()))
        return get_prices(conn)


def parse_price(field: str, value) -> int:
    """A price per hour as integer micro-units.

    Raises:
        ValidationError: not a finite number >= 0 with at most 6 decimals, or too large.
    """
    problem = ValidationError(f"{field} must be a price per hour: a number from 0 to "
                              f"{MAX_PRICE_MICROS // MICROS} with at most 6 decimals",
                              code="invalid_prices")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise problem
    if isinstance(value, float) and not math.isfinite(value):
        raise problem
    try:
        # str() first: Decimal(0.1) is the binary float's long expansion, not "0.1".
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise problem from None
    # Bounded before scaling: "1e999999" would overflow Decimal's context.
    if not amount.is_finite() or amount < 0 or amount > Decimal(MAX_PRICE_MICROS) / MICROS:
        raise problem
    micros = amount * MICROS
    if micros != micros.to_integral_value():
        raise problem
    return int(micros)


def _currency(value) -> str:
    if not isinstance(value, str) or not 1 <= len(value.strip()) <= 8 or \
            not all(c.isalnum() or c in "$€£¥._-" for c in value.strip()):
        raise ValidationError("currency must be a short label such as EUR or USD (1-8 letters)",
                              code="invalid_prices")
    return value.strip()


def prices_json(p: Prices) -> dict:
    return {"currency": p.currency, "cpu_hour": amount(p.cpu_hour_micros),
            "gb_hour": amount(p.gb_hour_micros), "gpu_hour": amount(p.gpu_hour_micros),
            "memory_basis": "reserved memory_mb x wall time",
            "updated_at": iso(p.updated_at), "updated_by": p.updated_by}


# ------------------------------------------------------------------------ cost

def compute_cost(job: dict, prices: Prices) -> dict:
    """A job's cost in micro-units, by component. Missing usage counts as zero.

    Returns:
        {"cpu": micros, "memory": micros, "gpu": micros, "total": micros}; each
        component is rounded half-even once, and total is exactly their sum.
    """
    hours = {
        "cpu": _dec(job.get("cpu_seconds")) / 3600,
        "memory": Decimal(job["memory_mb"]) / 1024 * _dec(job.get("wall_seconds")) / 3600,
        "gpu": _dec(job.get("gpu_seconds")) / 3600,
    }
    rates = {"cpu": prices.cpu_hour_micros, "memory": prices.gb_hour_micros,
             "gpu": prices.gpu_hour_micros}
    parts = {k: int((hours[k] * rates[k]).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
             for k in hours}
    return dict(parts, total=sum(parts.values()))


def record_cost(conn, job_id: str) -> dict:
    """Fix a just-finished job's cost with the prices in force now (inside its transaction).

    Every try is billed: the final one (the job row) and each earlier one
    (`billed_usage`), a policy retry or a lost worker's try alike; the
    cluster ran them all.

    Returns:
        The job row as read before the cost was stored.
    """
    job = conn.query_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
    prices = get_prices(conn)
    cost = compute_cost(dict(job, **billed_usage(conn, job)), prices)
    conn.execute(
        "UPDATE jobs SET cost_currency = ?, cost_cpu_micros = ?, cost_memory_micros = ?,"
        " cost_gpu_micros = ?, cost_micros = ? WHERE id = ?",
        (prices.currency, cost["cpu"], cost["memory"], cost["gpu"], cost["total"], job_id))
    return job


def billed_usage(conn, job: dict) -> dict:
    """The cpu, wall and GPU seconds of all the job's tries: its row's (the
    final try's) plus its earlier tries' (job_tries, retries.py), which the
    row does not include. A lost worker's try reported nothing: zero.

    Returns:
        {"cpu_seconds", "wall_seconds", "gpu_seconds"}, each None where no try reported it.
    """
    if (job.get("attempt") or 0) <= 1:
        return {k: job.get(k) for k in TRY_USAGE}   # a first try has no earlier ones
    earlier = conn.query_one(
        "SELECT " + ", ".join(f"SUM({k}) AS {k}" for k in TRY_USAGE)
        + " FROM job_tries WHERE job_id = ?", (job["id"],))
    return {k: None if job.get(k) is None and earlier[k] is None
            else float(job.get(k) or 0) + float(earlier[k] or 0) for k in TRY_USAGE}


def cost_json(job: dict) -> dict | None:
    """The `cost` object of a job's JSON; None until the job is final."""
    if job.get("cost_micros") is None:
        return None
    return {"amount": amount(job["cost_micros"]), "amount_micros": job["cost_micros"],
            "currency": job["cost_currency"],
            "breakdown": {"cpu": amount(job["cost_cpu_micros"]),
                          "memory": amount(job["cost_memory_micros"]),
                          "gpu": amount(job["cost_gpu_micros"])}}


def amount(micros: int) -> str:
    """Integer micro-units as an exact decimal string: 1234567 -> "1.234567"."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS)
    return f"{sign}{whole}.{frac:06d}"


def _dec(value) -> Decimal:
    return Decimal(value) if value is not None else Decimal(0)


# ----------------------------------------------------------------------- usage

@dataclass(frozen=True)
class UsageQuery:
    period: str
    since: date
    until: date  # inclusive


def parse_query(args: dict, today: date | None = None) -> UsageQuery:
    """Validate ?period=day|month&since=YYYY-MM-DD&until=YYYY-MM-DD.

    Defaults: the last 30 days (period=day) or the last 12 months (period=month).

    Raises:
        ValidationError: an unknown period, a malformed date, a reversed or too long range.
    """
    today = today or datetime.now(timezone.utc).date()
    period = args.get("period") or "day"
    if period not in PERIODS:
        raise ValidationError("period must be day or month", code="invalid_parameter")
    until = _date_arg(args, "until") or today
    since = _date_arg(args, "since")
    if since is None:
        since = until - timedelta(days=29) if period == "day" else \
            _month_start(until, -11)
    if since > until:
        raise ValidationError("since must not be after until", code="invalid_parameter")
    if period == "day" and (until - since).days + 1 > MAX_DAYS:
        raise ValidationError(f"a daily report covers at most {MAX_DAYS} days",
                              code="invalid_parameter")
    if period == "month" and _months_between(since, until) + 1 > MAX_MONTHS:
        raise ValidationError(f"a monthly report covers at most {MAX_MONTHS} months",
                              code="invalid_parameter")
    return UsageQuery(period, since, until)


def _date_arg(args: dict, name: str) -> date | None:
    raw = args.get(name)
    if not raw:
        return None
    try:
        if len(raw) != 10:
            raise ValueError
        value = date.fromisoformat(raw)
    except ValueError:
        raise ValidationError(f"{name} must be a date YYYY-MM-DD", code="invalid_parameter") from None
    # Job times are epoch seconds; far dates would also overflow the range arithmetic.
    if not MIN_YEAR <= value.year <= MAX_YEAR:
        raise ValidationError(f"{name} must be a date between {MIN_YEAR} and {MAX_YEAR}",
                              code="invalid_parameter")
    return value


def _month_start(d: date, delta_months: int = 0) -> date:
    index = d.year * 12 + d.month - 1 + delta_months
    return date(index // 12, index % 12 + 1, 1)


def _months_between(a: date, b: date) -> int:
    return (b.year - a.year) * 12 + b.month - a.month


# The UTC day number of a finish time, floor(finished_at / 86400), alike on both
# databases: CAST to an integer truncates on SQLite but rounds on PostgreSQL
# (23:59:59.6 would land on the next day), so step back one wherever the cast
# landed above the value. SQLite has no FLOOR unless built with its math functions.
_DAY_NUMBER = ("CAST(j.finished_at / 86400.0 AS BIGINT) - CASE WHEN"
               " CAST(j.finished_at / 86400.0 AS BIGINT) > j.finished_at / 86400.0"
               " THEN 1 ELSE 0 END")
_EPOCH = date(1970, 1, 1)


def report(conn, query: UsageQuery, owner_id: str | None) -> dict:
    """Totals per period (and per user, when `owner_id` is None: an admin's view of everyone).

    Finished jobs count on the UTC day they finished, with all their tries'
    usage (record_cost bills them all). The database sums them
    per user, currency and day in one pass over the (owner_id, finished_at) or
    (finished_at) index, so an admin's year of everyone's jobs is at most
    users x currencies x 366 rows here; days are rolled into months below.

    Returns:
        {"period", "since", "until", "rows": [...], "totals": [...]}: one row per
        (period, user, currency) with jobs; totals per currency.
    """
    start = datetime(query.since.year, query.since.month, query.since.day, tzinfo=timezone.utc)
    end = datetime(query.until.year, query.until.month, query.until.day,
                   tzinfo=timezone.utc) + timedelta(days=1)
    finals = sorted(FINAL_VALUES)
    where = ["j.finished_at >= ?", "j.finished_at < ?",
             f"j.state IN ({', '.join('?' for _ in finals)})"]
    params: list = [start.timestamp(), end.timestamp(), *finals]
    if owner_id is not None:
        where.insert(0, "j.owner_id = ?")
        params.insert(0, owner_id)
    days = conn.query(
        f"SELECT u.name AS owner, j.cost_currency AS currency, {_DAY_NUMBER} AS day,"
        " COUNT(*) AS jobs, SUM(COALESCE(j.cpu_seconds, 0)) AS cpu_seconds,"
        " SUM(j.memory_mb * COALESCE(j.wall_seconds, 0)) AS mb_seconds,"
        " SUM(COALESCE(j.gpu_seconds, 0)) AS gpu_seconds,"
        " SUM(COALESCE(j.cost_micros, 0)) AS cost_micros"
        f" FROM jobs j JOIN users u ON u.id = j.owner_id WHERE {' AND '.join(where)}"
        " GROUP BY 1, 2, 3", params)
    # Earlier tries (job_tries) count on their job's day, as its cost does
    # (record_cost): the hours and the cost of a period then agree.
    days += conn.query(
        f"SELECT u.name AS owner, j.cost_currency AS currency, {_DAY_NUMBER} AS day,"
        " 0 AS jobs, SUM(COALESCE(t.cpu_seconds, 0)) AS cpu_seconds,"
        " SUM(j.memory_mb * COALESCE(t.wall_seconds, 0)) AS mb_seconds,"
        " SUM(COALESCE(t.gpu_seconds, 0)) AS gpu_seconds, 0 AS cost_micros"
        " FROM job_tries t JOIN jobs j ON j.id = t.job_id JOIN users u ON u.id = j.owner_id"
        f" WHERE {' AND '.join(where)} GROUP BY 1, 2, 3", params)
    rows: dict[tuple, dict] = {}
    totals: dict[str, dict] = {}
    for day in days:
        label = (_EPOCH + timedelta(days=int(day["day"]))).isoformat()
        label = label if query.period == "day" else label[:7]
        currency = day["currency"] or DEFAULT_CURRENCY
        for bucket in (rows.setdefault((label, day["owner"], currency),
                                       _empty(period=label, user=day["owner"], currency=currency)),
                       totals.setdefault(currency, _empty(currency=currency))):
            _add(bucket, day)
    return {"period": query.period, "since": query.since.isoformat(),
            "until": query.until.isoformat(),
            "rows": [_finish(r) for _, r in sorted(rows.items())],
            "totals": [_finish(t) for _, t in sorted(totals.items())]}


def _empty(**keys) -> dict:
    return dict(keys, jobs=0, cpu_seconds=0.0, gb_seconds=0.0, gpu_seconds=0.0, cost_micros=0)


def _add(bucket: dict, day: dict) -> None:
    """Add one (user, currency, day) sum from the database to a period's bucket."""
    # PostgreSQL sums BIGINT as NUMERIC (a Decimal here): back to exact integers.
    bucket["jobs"] += int(day["jobs"])
    bucket["cpu_seconds"] += float(day["cpu_seconds"] or 0)
    bucket["gb_seconds"] += float(day["mb_seconds"] or 0) / 1024
    bucket["gpu_seconds"] += float(day["gpu_seconds"] or 0)
    bucket["cost_micros"] += int(day["cost_micros"] or 0)


def _finish(bucket: dict) -> dict:
    out = {k: v for k, v in bucket.items()
           if k not in ("cpu_seconds", "gb_seconds", "gpu_seconds")}
    out.update(cpu_hours=round(bucket["cpu_seconds"] / 3600, 6),
               gb_hours=round(bucket["gb_seconds"] / 3600, 6),
               gpu_hours=round(bucket["gpu_seconds"] / 3600, 6),
               cost=amount(bucket["cost_micros"]))
    return out


CSV_COLUMNS = ("period", "user", "jobs", "cpu_hours", "gb_hours", "gpu_hours", "cost",
               "currency")


def report_csv(data: dict) -> str:
    """The report's rows as CSV, the same figures as the JSON."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in data["rows"]:
        writer.writerow([row[c] for c in CSV_COLUMNS])
    return buf.getvalue()


def chart_series(data: dict) -> list[tuple[str, int]]:
    """(period label, cost in micros of the first currency) for every period of the range."""
    labels = _labels(data)
    currency = data["totals"][0]["currency"] if data["totals"] else DEFAULT_CURRENCY
    cost = dict.fromkeys(labels, 0)
    for row in data["rows"]:
        if row["currency"] == currency:
            cost[row["period"]] += row["cost_micros"]
    return list(cost.items())


def hours_series(data: dict, measure: str) -> list[tuple[str, float]]:
    """(period label, `measure` summed over users and currencies) for every period of the range.

    Args:
        measure: "cpu_hours", "gb_hours" or "gpu_hours".
    """
    hours = dict.fromkeys(_labels(data), 0.0)
    for row in data["rows"]:
        hours[row["period"]] += row[measure]
    return [(label, round(value, 6)) for label, value in hours.items()]


def billed(prices: Prices) -> bool:
    """Whether jobs are billed: an admin has set some price above zero.

    Until then every job costs 0 in the default currency, and the pages show
    usage only instead of "0.000000 USD" everywhere; the API still answers
    its cost objects (zero), as its contract says.
    """
    return any((prices.cpu_hour_micros, prices.gb_hour_micros, prices.gpu_hour_micros))


def _labels(data: dict) -> list[str]:
    since, until = date.fromisoformat(data["since"]), date.fromisoformat(data["until"])
    if data["period"] == "day":
        return [(since + timedelta(days=i)).isoformat() for i in range((until - since).days + 1)]
    return [_month_start(since, i).isoformat()[:7] for i in range(_months_between(since, until) + 1)]
