-- twinwatch: features
-- Per machine, metric and window: mean, spread, extremes and count of the readings.
-- Long form: one row per (machine, window, feature); features are named <metric>.<statistic>.
-- The readings are grouped once and each group's row is repeated for the five statistics:
-- five SELECTs over `s` joined by UNION ALL would group them five times (a CTE is inlined
-- where it is used, not computed once).
WITH s AS (
    SELECT machine, window_start, metric,
           avg(value)        AS mean,
           stddev_pop(value) AS std,
           min(value)        AS lo,
           max(value)        AS hi,
           count(value)      AS n
    FROM readings
    WHERE value IS NOT NULL
    GROUP BY machine, window_start, metric
),
statistics (statistic) AS (
    VALUES ('mean'), ('std'), ('min'), ('max'), ('count')
)
SELECT s.machine, s.window_start, s.metric || '.' || statistics.statistic AS feature,
       CASE statistics.statistic
           WHEN 'mean' THEN s.mean
           WHEN 'std'  THEN s.std
           WHEN 'min'  THEN s.lo
           WHEN 'max'  THEN s.hi
           ELSE CAST(s.n AS DOUBLE)
       END AS value
FROM s CROSS JOIN statistics
