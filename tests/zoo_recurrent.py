"""Zoo architectures with recurrent layers: an unrolled cell and torch's RNN, LSTM and GRU."""

from __future__ import annotations

import torch
from case import B, Case, mse
from torch import Tensor, nn


class UnrolledGRUCell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell, self.head = nn.GRUCell(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = x.new_zeros(x.shape[0], 4)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        out: Tensor = self.head(h)
        return out


def gru_cell_unrolled() -> Case:
    model = UnrolledGRUCell()
    return Case(model, torch.randn(B, 5, 3), [model.cell, model.head], mse, resumed=False)


class Recurrent(nn.Module):
    """A recurrent layer (its own batch layout) and a head on the last time step; with
    ``initial``, the initial states come from a trunk layer (batch on their dim 1)."""

    def __init__(self, rnn: nn.RNNBase, initial: bool = False) -> None:
        super().__init__()
        self.rnn, self.initial = rnn, initial
        directions = 2 if rnn.bidirectional else 1
        out = rnn.proj_size if isinstance(rnn, nn.LSTM) and rnn.proj_size else rnn.hidden_size
        self.state = nn.Linear(3, rnn.num_layers * directions * rnn.hidden_size)
        self.head = nn.Linear(directions * out, 2)

    def forward(self, x: Tensor) -> Tensor:
        rnn = self.rnn
        hx: Tensor | tuple[Tensor, Tensor] | None = None
        if self.initial:  # [layers · directions, B, hidden]
            h = torch.tanh(self.state(x.mean(dim=1 if rnn.batch_first else 0)))
            h = h.view(x.shape[0 if rnn.batch_first else 1], -1, rnn.hidden_size).transpose(0, 1)
            hx = (h.contiguous(), torch.sigmoid(h).contiguous()) if isinstance(rnn, nn.LSTM) else h
        output = rnn(x, hx)[0]
        last = output[:, -1] if rnn.batch_first else output[-1]
        out: Tensor = self.head(last)
        return out


def gru_batch_first() -> Case:
    model = Recurrent(nn.GRU(3, 4, num_layers=2, batch_first=True))
    return Case(model, torch.randn(B, 5, 3), [model.rnn, model.head], mse, resumed=False)


def lstm_time_first_bidirectional() -> Case:
    model = Recurrent(nn.LSTM(3, 4, num_layers=2, bidirectional=True), initial=True)
    return Case(model, torch.randn(5, B, 3), [model.rnn, model.head], mse, resumed=False)


def lstm_projection() -> Case:
    model = Recurrent(nn.LSTM(3, 5, proj_size=2, batch_first=True))
    return Case(model, torch.randn(B, 4, 3), [model.rnn], mse, resumed=False)


def rnn_relu_time_first() -> Case:
    model = Recurrent(nn.RNN(3, 4, nonlinearity="relu"), initial=True)
    return Case(model, torch.randn(6, B, 3), [model.rnn, model.head], mse, resumed=False)
