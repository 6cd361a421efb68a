;; badlog: on its first tick, asks the host to log 100 bytes starting 16 bytes before the
;; end of the address space. The host must refuse (a trap), not read out of bounds.
(module
  (import "mesh" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)

  (func (export "on_tick")
    (call $log (i32.const -16) (i32.const 100)))
)
