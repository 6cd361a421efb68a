;; trap: starts fine, then traps on its first tick. Used to exercise restarts and the
;; restart budget.
(module
  (import "mesh" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "starting, about to trap")   ;; 23 bytes

  (func (export "init")
    (call $log (i32.const 0) (i32.const 23)))

  (func (export "on_tick")
    unreachable)
)
