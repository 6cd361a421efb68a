;; logspam: logs 1000 lines of 10 bytes on every tick. Its log rate quota (log bytes per
;; second) drops what is over the rate and counts it; the module itself keeps running.
(module
  (import "mesh" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "spam spam!")
  (func (export "on_tick")
    (local $i i32)
    (loop $more
      (call $log (i32.const 0) (i32.const 10))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $more (i32.lt_u (local.get $i) (i32.const 1000)))))
)
