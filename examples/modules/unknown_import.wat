;; unknown_import: imports a function the host does not provide. Deploying it must be
;; refused with the import's name, before anything runs.
(module
  (import "env" "system" (func $system (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "on_tick"))
)
