//! Calendar arithmetic on epoch milliseconds (UTC), for rollup buckets, quota periods and
//! monthly partitions.

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

pub fn hour_start(ms: i64) -> i64 {
    ms.div_euclid(HOUR) * HOUR
}

pub fn day_start(ms: i64) -> i64 {
    ms.div_euclid(DAY) * DAY
}

/// (year, month 1..=12) of a day count since 1970-01-01 (H. Hinnant's civil-from-days).
fn civil(days: i64) -> (i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m)
}

/// Days since 1970-01-01 of the first day of (year, month).
fn days_from_civil(y: i64, m: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub fn month_start(ms: i64) -> i64 {
    let (y, m) = civil(ms.div_euclid(DAY));
    days_from_civil(y, m) * DAY
}

pub fn next_month_start(ms: i64) -> i64 {
    let (y, m) = civil(month_start(ms).div_euclid(DAY));
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    days_from_civil(y, m) * DAY
}

/// `usage_events_YYYY_MM` for the month starting at `month`.
pub(crate) fn partition_name(month: i64) -> String {
    let (y, m) = civil(month.div_euclid(DAY));
    format!("usage_events_{y:04}_{m:02}")
}

/// The month start of a partition name written by [`partition_name`].
pub(crate) fn partition_month(name: &str) -> Option<i64> {
    let rest = name.strip_prefix("usage_events_")?;
    let (y, m) = rest.split_once('_')?;
    let (y, m): (i64, i64) = (y.parse().ok()?, m.parse().ok()?);
    (1..=12).contains(&m).then(|| days_from_civil(y, m) * DAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_and_names() {
        // 2026-11-26T01:52:57Z
        let t = 1_795_657_977_000;
        assert_eq!(partition_name(month_start(t)), "usage_events_2026_11");
        assert_eq!(partition_name(next_month_start(t)), "usage_events_2026_12");
        assert_eq!(
            partition_name(next_month_start(next_month_start(t))),
            "usage_events_2027_01"
        );
        assert_eq!(
            partition_month("usage_events_2026_11"),
            Some(month_start(t))
        );
        assert_eq!(partition_month("usage_events_default"), None);
        assert_eq!(month_start(0), 0);
        assert_eq!(day_start(t) % DAY, 0);
        assert!(hour_start(t) <= t && t - hour_start(t) < HOUR);
    }
}
