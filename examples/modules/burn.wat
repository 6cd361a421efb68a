;; burn: busy-waits 40 ms on every tick, well inside its per-call deadline but far over a
;; small CPU share. Its CPU meter skips ticks (counted as throttled) until the share has
;; paid the time back; the module is never restarted for it.
(module
  (import "mesh" "now_us" (func $now (result i64)))
  (memory (export "memory") 1)
  (func (export "on_tick")
    (local $end i64)
    (local.set $end (i64.add (call $now) (i64.const 40000)))
    (loop $spin
      (br_if $spin (i64.lt_s (call $now) (local.get $end)))))
)
