-- twinwatch: features
-- Per machine and window: messages, distinct sending devices, and sequence numbers missing
-- between the lowest and highest seen from each device. (Payload sizes are judged per device
-- on the fast path, `traffic_size`, with floors a window sum of bytes has not: a few bytes
-- more when a reading gains a digit would read as many sigmas here.)
WITH per_device AS (
    SELECT machine, window_start, device,
           count(*)                    AS messages,
           CAST(max(seq) AS BIGINT) - CAST(min(seq) AS BIGINT) + 1 - count(seq) AS gaps
    FROM messages
    GROUP BY machine, window_start, device
)
SELECT machine, window_start,
       sum(messages)                                   AS messages,
       count(*)                                        AS devices,
       sum(CASE WHEN gaps > 0 THEN gaps ELSE 0 END)    AS seq_gaps
FROM per_device
GROUP BY machine, window_start
