-- twinwatch: features
-- Per machine and window: messages, payload bytes, distinct sending devices, and sequence
-- numbers missing between the lowest and highest seen from each device.
WITH per_device AS (
    SELECT machine, window_start, device,
           count(*)                    AS messages,
           sum(payload_bytes)          AS bytes,
           CAST(max(seq) AS BIGINT) - CAST(min(seq) AS BIGINT) + 1 - count(seq) AS gaps
    FROM messages
    GROUP BY machine, window_start, device
)
SELECT machine, window_start,
       sum(messages)                                   AS messages,
       sum(bytes)                                      AS bytes,
       count(*)                                        AS devices,
       sum(CASE WHEN gaps > 0 THEN gaps ELSE 0 END)    AS seq_gaps
FROM per_device
GROUP BY machine, window_start
