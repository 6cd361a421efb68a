;; spin: starts fine, then loops forever on its first tick. The call's epoch deadline
;; (call_ms_max) is what stops it.
(module
  (memory (export "memory") 1)

  (func (export "on_tick")
    (loop $forever
      (br $forever)))
)
