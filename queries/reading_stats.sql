-- twinwatch: features
-- Per machine, metric and window: mean, spread, extremes and count of the readings.
-- Long form: one row per (machine, window, feature); features are named <metric>.<statistic>.
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
)
SELECT machine, window_start, metric || '.mean'  AS feature, mean            AS value FROM s
UNION ALL
SELECT machine, window_start, metric || '.std'   AS feature, std             AS value FROM s
UNION ALL
SELECT machine, window_start, metric || '.min'   AS feature, lo              AS value FROM s
UNION ALL
SELECT machine, window_start, metric || '.max'   AS feature, hi              AS value FROM s
UNION ALL
SELECT machine, window_start, metric || '.count' AS feature, CAST(n AS DOUBLE) AS value FROM s
