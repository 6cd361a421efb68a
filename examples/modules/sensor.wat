;; sensor: on every tick reads /run/mesh/sensors/temp (which must be on the node's sensor
;; allowlist) and publishes the reading on topic "temp". When the read is refused or
;; fails, it publishes "?" instead, so a subscriber sees every tick either way.
(module
  (import "mesh" "sensor_read" (func $sensor_read (param i32 i32 i32 i32) (result i32)))
  (import "mesh" "publish" (func $publish (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "/run/mesh/sensors/temp")   ;; 22 bytes
  (data (i32.const 32) "temp")                    ;; the topic, 4 bytes
  (data (i32.const 40) "?")
  (func (export "on_tick")
    (local $n i32)
    (local.set $n (call $sensor_read (i32.const 0) (i32.const 22) (i32.const 64) (i32.const 64)))
    (if (i32.gt_s (local.get $n) (i32.const 64)) (then (local.set $n (i32.const 64))))
    (if (i32.lt_s (local.get $n) (i32.const 1))
      (then (drop (call $publish (i32.const 32) (i32.const 4) (i32.const 40) (i32.const 1))))
      (else (drop (call $publish (i32.const 32) (i32.const 4) (i32.const 64) (local.get $n))))))
)
