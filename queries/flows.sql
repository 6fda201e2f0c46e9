-- twinwatch: features
-- Per machine and window: traffic volume, the largest volume to a single peer (exfiltration),
-- the most distinct destinations and ports touched by one source (scanning), and write operations.
WITH totals AS (
    SELECT machine, window_start,
           sum(bytes)                                                 AS bytes,
           sum(coalesce(packets, 0))                                  AS packets,
           count(*)                                                   AS records,
           sum(CASE WHEN lower(op) LIKE '%write%' THEN 1 ELSE 0 END)  AS write_ops
    FROM flows
    GROUP BY machine, window_start
),
per_source AS (
    SELECT machine, window_start, src,
           count(DISTINCT dst)      AS destinations,
           count(DISTINCT dst_port) AS ports
    FROM flows
    GROUP BY machine, window_start, src
),
per_peer AS (
    SELECT machine, window_start, dst, sum(bytes) AS bytes
    FROM flows
    GROUP BY machine, window_start, dst
),
fanout AS (
    SELECT machine, window_start,
           max(destinations) AS max_destinations_per_source,
           max(ports)        AS max_ports_per_source
    FROM per_source
    GROUP BY machine, window_start
),
top_peer AS (
    SELECT machine, window_start, max(bytes) AS max_bytes_to_one_peer
    FROM per_peer
    GROUP BY machine, window_start
)
SELECT t.machine, t.window_start, t.bytes, t.packets, t.records, t.write_ops,
       f.max_destinations_per_source, f.max_ports_per_source, p.max_bytes_to_one_peer
FROM totals t
JOIN fanout f ON f.machine = t.machine AND f.window_start = t.window_start
JOIN top_peer p ON p.machine = t.machine AND p.window_start = t.window_start
