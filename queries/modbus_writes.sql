-- twinwatch: rule severity=high
-- Modbus writes may only come from the engineering workstations. Edit the list for your plant.
SELECT machine, window_start,
       CAST(count(*) AS DOUBLE) AS value,
       'Modbus ' || min(op) || ' from ' || src || ' to ' || min(dst) || ', not an engineering workstation' AS explanation
FROM flows
WHERE app = 'modbus'
  AND lower(op) LIKE '%write%'
  AND src NOT IN ('10.20.0.20')
GROUP BY machine, window_start, src
